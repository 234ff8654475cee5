pub mod linkemu;
pub mod sim;
pub mod topo;
