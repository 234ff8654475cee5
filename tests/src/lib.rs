pub mod linkemu;
pub mod topo;
pub mod sim;
