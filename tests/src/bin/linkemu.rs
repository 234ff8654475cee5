//! `stallnet-linkemu A B CONTROL_SOCKET [KEY=VALUE…]`: the userspace link emulator.
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        anyhow::bail!("usage: stallnet-linkemu A B CONTROL_SOCKET [KEY=VALUE...]");
    }
    let initial: Vec<&str> = args[3..].iter().map(String::as_str).collect();
    stallnet_tests::linkemu::run(&args[0], &args[1], std::path::Path::new(&args[2]), &initial)
}
