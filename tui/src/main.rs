//! `stallnet-tui`: the dashboard on a terminal (tty1 on the box's HDMI screen, or over
//! SSH). Polls the control API twice a second, redraws on resize, never crashes when the
//! daemon is missing (it says so and retries). `--once` prints one text snapshot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use stallnet::control_client::Client;
use stallnet_tui::model::Model;
use stallnet_tui::view::{self, Ui};

#[derive(Parser)]
#[command(name = "stallnet-tui", version, about = "stallnet's dashboard")]
struct Args {
    /// Where the daemon's control socket is.
    #[arg(long, default_value = "/run/stallnet")]
    runtime_dir: PathBuf,
    /// Print one text snapshot and exit (for scripts and support tickets).
    #[arg(long)]
    once: bool,
    /// Snapshot size for --once.
    #[arg(long, default_value_t = 100)]
    width: u16,
    #[arg(long, default_value_t = 30)]
    height: u16,
    /// Plain ASCII graphs (automatic on the Linux console, TERM=linux).
    #[arg(long)]
    ascii: bool,
    /// Milliseconds between refreshes.
    #[arg(long, default_value_t = 500)]
    refresh_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(&args.runtime_dir);
    let mut ui = Ui {
        ascii: args.ascii || std::env::var("TERM").is_ok_and(|t| t == "linux"),
        socket: stallnet::control::socket_path(&args.runtime_dir)
            .display()
            .to_string(),
        ..Ui::default()
    };
    let start = Instant::now();
    let mut model = Model::default();
    if args.once {
        // Two polls a second apart, so rates are real.
        poll(&rt, &client, &mut model, start.elapsed());
        if model.connected.is_some() {
            std::thread::sleep(Duration::from_secs(1));
            poll(&rt, &client, &mut model, start.elapsed());
        }
        print!(
            "{}",
            stallnet_tui::render_text(&model, &ui, args.width, args.height)
        );
        if model.connected.is_none() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = run(
        &rt,
        &client,
        &mut model,
        &mut ui,
        &mut terminal,
        &args,
        start,
    );
    ratatui::restore();
    result
}

fn poll(rt: &tokio::runtime::Runtime, client: &Client, model: &mut Model, now: Duration) {
    let since = model.last_event();
    let got = rt.block_on(async {
        let status = client.get("/v1/status").await?;
        let events = client.get(&format!("/v1/events?since={since}")).await?;
        Ok::<_, stallnet::control_client::ClientError>((status, events))
    });
    match got {
        Ok((status, events)) => {
            model.update(&status, now);
            model.add_events(&events);
        }
        Err(stallnet::control_client::ClientError::NotRunning { source, .. }) => {
            model.unreachable(source.to_string())
        }
        Err(e) => model.unreachable(e.to_string()),
    }
}

fn run(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    model: &mut Model,
    ui: &mut Ui,
    terminal: &mut ratatui::DefaultTerminal,
    args: &Args,
    start: Instant,
) -> Result<()> {
    let refresh = Duration::from_millis(args.refresh_ms.max(100));
    let mut next_poll = Instant::now();
    loop {
        if Instant::now() >= next_poll {
            poll(rt, client, model, start.elapsed());
            next_poll = Instant::now() + refresh;
            terminal.draw(|f| view::draw(f, model, ui))?;
        }
        let wait = next_poll.saturating_duration_since(Instant::now());
        if !event::poll(wait)? {
            continue;
        }
        match event::read()? {
            Event::Resize(..) => {}
            Event::Key(k) if k.kind == KeyEventKind::Press => {
                let uplinks: Vec<String> = model
                    .connected
                    .as_ref()
                    .map(|c| c.uplinks.iter().map(|u| u.name.clone()).collect())
                    .unwrap_or_default();
                // On a hub the arrows choose a stall, and uplink actions are the edge's.
                let stalls: Option<Vec<String>> = model
                    .connected
                    .as_ref()
                    .filter(|c| c.role == "hub")
                    .map(|c| c.fleet.iter().map(|r| r.name.clone()).collect());
                if ui.help {
                    ui.help = false;
                } else if let Some((verb, name)) = ui.confirm.clone() {
                    ui.confirm = None;
                    if matches!(k.code, KeyCode::Char('y') | KeyCode::Char('Y')) {
                        let path = format!("/v1/uplinks/{name}/{verb}");
                        ui.message = Some(match rt.block_on(client.request(hyper_post(), &path)) {
                            Ok(doc) => doc["message"].as_str().unwrap_or("done").to_string(),
                            Err(e) => format!("refused: {e}"),
                        });
                    }
                } else {
                    match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(())
                        }
                        KeyCode::Char('?') | KeyCode::Char('h') => ui.help = true,
                        KeyCode::Up | KeyCode::Char('k') => {
                            ui.selected = ui.selected.saturating_sub(1);
                            if let Some(s) = &stalls {
                                model.focus(s.get(ui.selected).cloned());
                                poll(rt, client, model, start.elapsed());
                            }
                        }
                        KeyCode::Down | KeyCode::Char('j') => {
                            let n = stalls.as_ref().map_or(uplinks.len(), Vec::len);
                            ui.selected = (ui.selected + 1).min(n.saturating_sub(1));
                            if let Some(s) = &stalls {
                                model.focus(s.get(ui.selected).cloned());
                                poll(rt, client, model, start.elapsed());
                            }
                        }
                        KeyCode::Char('d') | KeyCode::Char('e') if stalls.is_some() => {
                            ui.message = Some("uplinks are switched on the stall's box".into());
                        }
                        KeyCode::Char('d') | KeyCode::Char('e') => {
                            if let Some(name) = uplinks.get(ui.selected) {
                                let verb = if k.code == KeyCode::Char('d') {
                                    "disable"
                                } else {
                                    "enable"
                                };
                                ui.message = None;
                                ui.confirm = Some((verb.to_string(), name.clone()));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => continue,
        }
        terminal.draw(|f| view::draw(f, model, ui))?;
    }
}

fn hyper_post() -> stallnet::control_client::Method {
    stallnet::control_client::Method::POST
}
