pub mod linkemu;
pub mod topo;
