//! Drawing the dashboard from the [`Model`]: a header with the state in words, colour and
//! a symbol; uplinks with rates and a history line; traffic (payments, stream, bulk);
//! sales waiting, in a sentence; recent events; the keys. Fits 80×24 and grows with the
//! terminal. `ascii` mode (the bare Linux console) avoids glyphs its font lacks.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

use crate::model::{age, rate, rate_short, sales_sentence, usage, Connected, Model, Overall};

/// What the operator is doing on the screen.
#[derive(Debug, Clone, Default)]
pub struct Ui {
    pub selected: usize,
    /// Waiting for y/n: (verb, uplink).
    pub confirm: Option<(String, String)>,
    pub help: bool,
    pub ascii: bool,
    /// The answer to the last action.
    pub message: Option<String>,
    /// Where the dashboard looks for the daemon (shown when it is missing).
    pub socket: String,
}

const GREEN: Color = Color::Green;
const YELLOW: Color = Color::Yellow;
const RED: Color = Color::Red;

pub fn draw(f: &mut Frame, m: &Model, ui: &Ui) {
    let area = f.area();
    let Some(c) = &m.connected else {
        missing(f, area, m, ui);
        return;
    };
    if c.role == "hub" {
        draw_fleet(f, area, c, m, ui);
        return;
    }
    let uplink_rows = c.uplinks.len().max(1) as u16;
    let [header, uplinks, middle, events, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(uplink_rows + 3),
        Constraint::Length(7),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(f, header, c, ui);
    draw_uplinks(f, uplinks, c, ui);
    let [traffic, sales] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(middle);
    draw_traffic(f, traffic, c, m);
    draw_sales(f, sales, c);
    draw_events(f, events, m);
    draw_footer(f, footer, ui);
    if let Some((verb, name)) = &ui.confirm {
        let r = centered(area, 44, 5);
        f.render_widget(Clear, r);
        f.render_widget(
            Paragraph::new(vec![
                Line::from(format!("{} uplink {name}?", capitalize(verb))),
                Line::from(""),
                Line::from("y: yes     n: no"),
            ])
            .block(Block::default().borders(Borders::ALL).title(" Confirm ")),
            r,
        );
    }
    if ui.help {
        draw_help(f, area);
    }
}

/// A hub's screen: the fleet (offline and degraded stalls first, the selected one
/// marked), the selected stall's uplinks, the hub's events.
fn draw_fleet(f: &mut Frame, area: Rect, c: &Connected, m: &Model, ui: &Ui) {
    let rows = (c.fleet.len().max(1) as u16).min(10);
    let uplink_rows = c.uplinks.len().max(1) as u16;
    let [header, fleet, uplinks, events, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(rows + 3),
        Constraint::Length(uplink_rows + 3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    let counts = |state: &str| c.fleet.iter().filter(|r| r.state == state).count();
    let (words, colour) = if counts("offline") > 0 {
        ("(X) STALLS OFFLINE", RED)
    } else if counts("degraded") > 0 {
        ("(!) STALLS DEGRADED", YELLOW)
    } else {
        ("(+) ALL STALLS ONLINE", GREEN)
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            badge(words, colour),
            Span::raw(format!(
                " hub | {} stalls: {} online, {} degraded, {} offline | up {}",
                c.fleet.len(),
                counts("online"),
                counts("degraded"),
                counts("offline"),
                age(c.uptime_s as i64)
            )),
        ])),
        header,
    );
    let block = Block::default().borders(Borders::ALL).title(" Stalls ");
    let mut lines = vec![Line::styled(
        format!(
            "  {:<14} {:<11} {:>5} {:<11} {}",
            "STALL", "STATE", "SALES", "LAST HEARD", "UPLINKS"
        ),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    if c.fleet.is_empty() {
        lines.push(Line::from(
            "  no stalls yet: `stallnet hub invite NAME` adds one",
        ));
    }
    // Scrolled so that the selected stall is on screen.
    let skip = ui
        .selected
        .saturating_sub(usize::from(rows).saturating_sub(1));
    for (i, r) in c
        .fleet
        .iter()
        .enumerate()
        .skip(skip)
        .take(usize::from(rows))
    {
        let (state, style) = match r.state.as_str() {
            "online" => ("+ online", Style::default().fg(GREEN)),
            "degraded" => ("! degraded", Style::default().fg(YELLOW)),
            _ => ("x offline", Style::default().fg(RED)),
        };
        let heard = match (r.state.as_str(), r.last_heard_s) {
            ("offline", Some(s)) => format!("{} ago", age(s as i64)),
            ("offline", None) => "not yet".to_string(),
            _ => "now".to_string(),
        };
        let links: Vec<String> = r.uplinks.iter().map(|(n, s)| format!("{n} {s}")).collect();
        let mark = if i == ui.selected { ">" } else { " " };
        // Sales waiting on the box: what the organiser chases when a stall is offline.
        let (sales, sales_style) = match r.sales_waiting {
            Some(0) => ("0".to_string(), Style::default()),
            Some(n) => (n.to_string(), Style::default().fg(YELLOW)),
            None => ("-".to_string(), Style::default()),
        };
        lines.push(Line::from(vec![
            Span::raw(format!("{mark} {:<14} ", trunc(&r.name, 14))),
            Span::styled(format!("{state:<11}"), style),
            Span::styled(format!(" {sales:>5}"), sales_style),
            Span::raw(format!(
                " {heard:<11} {}",
                if links.is_empty() {
                    "none connected".to_string()
                } else {
                    links.join(", ")
                }
            )),
        ]));
    }
    f.render_widget(Paragraph::new(lines).block(block), fleet);
    let title = c
        .shown
        .as_deref()
        .map_or("Uplinks".to_string(), |n| format!("Uplinks of {n}"));
    let block = Block::default()
        .borders(Borders::ALL)
        .title(format!(" {title} "));
    let inner = block.inner(uplinks);
    f.render_widget(block, uplinks);
    let mut lines = vec![Line::styled(
        format!(
            "  {:<8} {:<11} {:>7} {:>7} {:>9} {:>9}",
            "NAME", "STATE", "RTT", "LOSS", "UP", "DOWN"
        ),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    if c.uplinks.is_empty() {
        lines.push(Line::from("  none connected"));
    }
    for u in &c.uplinks {
        let (state, style) = state_style(&u.state);
        lines.push(Line::from(vec![
            Span::raw(format!("  {:<8} ", trunc(&u.name, 8))),
            Span::styled(format!("{state:<11}"), style),
            Span::raw(format!(
                " {:>7} {:>6.1}% {:>9} {:>9}",
                u.rtt_ms.map_or("-".into(), |r| format!("{r:.0}ms")),
                u.loss * 100.0,
                rate_short(u.up_bps),
                rate_short(u.down_bps),
            )),
        ]));
    }
    f.render_widget(Paragraph::new(lines), inner);
    draw_events(f, events, m);
    f.render_widget(
        Paragraph::new(Line::styled(
            " up/down: choose a stall   ?: help   q: quit",
            Style::default().fg(Color::DarkGray),
        )),
        footer,
    );
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// The state in words on its colour: the first thing an operator reads, on an edge and
/// on a hub alike.
fn badge(words: &str, colour: Color) -> Span<'static> {
    Span::styled(
        format!(" {words} "),
        Style::default()
            .fg(Color::Black)
            .bg(colour)
            .add_modifier(Modifier::BOLD),
    )
}

fn overall_words(o: Overall) -> (&'static str, Color) {
    match o {
        Overall::Online => ("(+) ONLINE", GREEN),
        Overall::Degraded => ("(!) DEGRADED", YELLOW),
        Overall::Offline => ("(X) OFFLINE", RED),
    }
}

fn draw_header(f: &mut Frame, r: Rect, c: &Connected, _ui: &Ui) {
    let (words, colour) = overall_words(c.overall);
    let clock = match c.clock.as_str() {
        "synced" => "clock ok".to_string(),
        "wrong" => "CLOCK WRONG".to_string(),
        _ => "clock not yet verified".to_string(),
    };
    let mut spans = vec![badge(words, colour), Span::raw(" ")];
    if c.fallback {
        spans.push(Span::styled(
            "direct fallback  ",
            Style::default().fg(YELLOW),
        ));
    }
    spans.push(Span::raw(format!(
        "{}{} | up {} | {clock}",
        if c.role == "hub" { "hub | " } else { "hub " },
        c.peer
            .as_deref()
            .unwrap_or(if c.role == "hub" { "" } else { "-" }),
        age(c.uptime_s as i64),
    )));
    f.render_widget(Paragraph::new(Line::from(spans)), r);
}

fn state_style(state: &str) -> (String, Style) {
    let (sym, colour) = match state {
        "up" => ("+", GREEN),
        // Behind a login page or forged DNS: out of the bond until the operator signs in.
        "degraded" | "captive" | "hijacked" => ("!", YELLOW),
        "suspect" | "probing" => ("?", YELLOW),
        "disabled" | "absent" => ("-", Color::DarkGray),
        _ => ("x", RED),
    };
    (format!("{sym} {state}"), Style::default().fg(colour))
}

/// A history line: one character per sample, scaled to the largest.
pub fn spark(values: &[u64], width: usize, ascii: bool) -> String {
    let set: Vec<char> = if ascii {
        " .:-=+*#".chars().collect()
    } else {
        " ▁▂▃▄▅▆▇█".chars().collect()
    };
    let tail = &values[values.len().saturating_sub(width)..];
    let max = tail.iter().copied().max().unwrap_or(0).max(1);
    tail.iter()
        .map(|v| {
            let i = (*v as f64 / max as f64 * (set.len() - 1) as f64).round() as usize;
            set[i.min(set.len() - 1)]
        })
        .collect()
}

fn draw_uplinks(f: &mut Frame, r: Rect, c: &Connected, ui: &Ui) {
    let block = Block::default().borders(Borders::ALL).title(" Uplinks ");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let fixed = 58usize;
    let spark_w = (inner.width as usize).saturating_sub(fixed + 1);
    let mut lines = vec![Line::styled(
        format!(
            "  {:<8} {:<8} {:<11} {:>6} {:>5} {:>5} {:>5} {:>5} {}",
            "NAME",
            "KIND",
            "STATE",
            "RTT",
            "JIT",
            "LOSS",
            "UP",
            "DOWN",
            if spark_w >= 5 { "DATA / TREND" } else { "" }
        ),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    if c.uplinks.is_empty() {
        lines.push(Line::from("  no uplinks configured"));
    }
    for (i, u) in c.uplinks.iter().enumerate() {
        let (state, style) = state_style(&u.state);
        let live = u.state == "up" || u.state == "degraded";
        let mark = if i == ui.selected { ">" } else { " " };
        let note = if u.preferred {
            " pref"
        } else if u.backup {
            " bkup"
        } else {
            ""
        };
        let mut spans = vec![
            Span::raw(format!(
                "{mark} {:<8} {:<8} ",
                trunc(&u.name, 8),
                trunc(&u.kind, 8)
            )),
            Span::styled(
                format!("{:<11}", trunc(&format!("{state}{note}"), 11)),
                style,
            ),
            Span::raw(if live {
                format!(
                    " {:>6} {:>5} {:>4.1}% {:>5} {:>5} ",
                    u.rtt_ms.map_or("-".into(), |r| format!("{r:.0}ms")),
                    format!("{:.0}ms", u.jitter_ms),
                    u.loss * 100.0,
                    rate_short(u.up_bps),
                    rate_short(u.down_bps),
                )
            } else {
                format!(" {:>6} {:>5} {:>5} {:>5} {:>5} ", "-", "-", "-", "-", "-")
            }),
        ];
        let mut spark_room = spark_w;
        if let Some((used, limit)) = u.cap {
            // Data used against the allowance comes first; red once it is nearly gone.
            let text = format!("{} ", usage(used, limit));
            spark_room = spark_room.saturating_sub(text.chars().count());
            let colour = if used * 100 >= limit * 95 {
                RED
            } else if used * 100 >= limit * 75 {
                YELLOW
            } else {
                Color::Reset
            };
            spans.push(Span::styled(text, Style::default().fg(colour)));
        }
        if spark_room >= 5 {
            spans.push(Span::styled(
                spark(&u.history, spark_room, ui.ascii),
                Style::default().fg(Color::Cyan),
            ));
        }
        lines.push(Line::from(spans));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

fn trunc(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn draw_traffic(f: &mut Frame, r: Rect, c: &Connected, m: &Model) {
    let class = |n: &str| c.classes.iter().find(|k| k.class == n);
    let pos_line = match c.overall {
        Overall::Offline => Line::styled(
            "Payments: NOT getting through",
            Style::default().fg(RED).add_modifier(Modifier::BOLD),
        ),
        _ => {
            let last = m.pos_idle_s.map_or("none seen yet".to_string(), |s| {
                format!("last {} ago", age(s as i64))
            });
            Line::from(vec![
                Span::styled("Payments: OK", Style::default().fg(GREEN)),
                Span::raw(format!(", {last}")),
            ])
        }
    };
    let delay = |n: &str| {
        class(n)
            .and_then(|k| k.delay_p99_ms)
            .map_or("-".to_string(), |d| format!("{d:.0} ms"))
    };
    let bps = |n: &str| class(n).map_or(0.0, |k| k.bps);
    let lines = vec![
        pos_line,
        Line::from(format!(
            "Stream:   {:>10}  queue p99 {}",
            rate(bps("stream")),
            delay("stream")
        )),
        Line::from(format!(
            "Bulk:     {:>10}  queue p99 {}",
            rate(bps("bulk")),
            delay("bulk")
        )),
        Line::from(format!(
            "Guests:   {:>10}  other {}",
            rate(bps("guest")),
            rate(bps("interactive"))
        )),
    ];
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Traffic ")),
        r,
    );
}

fn draw_sales(f: &mut Frame, r: Rect, c: &Connected) {
    let (text, style) = match &c.sales {
        None => (
            "Sales service not configured on this box.".to_string(),
            Style::default().fg(Color::DarkGray),
        ),
        Some(s) => {
            let colour =
                if s.storage_full || s.dead > 0 || s.oldest_s.is_some_and(|o| o >= 12 * 3600) {
                    RED
                } else if s.waiting > 0 && !s.online {
                    YELLOW
                } else {
                    GREEN
                };
            (sales_sentence(s), Style::default().fg(colour))
        }
    };
    f.render_widget(
        Paragraph::new(Line::styled(text, style))
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(" Sales ")),
        r,
    );
}

fn draw_events(f: &mut Frame, r: Rect, m: &Model) {
    let rows = r.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = m
        .events
        .iter()
        .rev()
        .take(rows)
        .map(|e| {
            let secs = e.at_ms / 1000;
            let (h, mi, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            let (sym, colour) = match e.level.as_str() {
                "critical" => ("X", RED),
                "warning" => ("!", YELLOW),
                _ => (" ", Color::Reset),
            };
            Line::from(vec![
                Span::raw(format!("{h:02}:{mi:02}:{s:02} ")),
                Span::styled(format!("{sym} {}", e.message), Style::default().fg(colour)),
            ])
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" Events (UTC, newest first) "),
        ),
        r,
    );
}

fn draw_footer(f: &mut Frame, r: Rect, ui: &Ui) {
    let text = ui
        .message
        .clone()
        .unwrap_or_else(|| "q quit  ? help  up/down select  d disable  e enable".to_string());
    f.render_widget(
        Paragraph::new(Line::styled(
            format!(" {text}"),
            Style::default().add_modifier(Modifier::REVERSED),
        )),
        r,
    );
}

fn draw_help(f: &mut Frame, area: Rect) {
    let r = centered(area, 64, 16);
    f.render_widget(Clear, r);
    let lines = vec![
        Line::from("(+) ONLINE    every uplink works"),
        Line::from("(!) DEGRADED  some uplinks are down: still selling"),
        Line::from("(X) OFFLINE   no connection: sales are kept on the box"),
        Line::from(""),
        Line::from("Payments are sent on two uplinks at once and always first."),
        Line::from("Sales made offline upload by themselves later."),
        Line::from(""),
        Line::from("up/down  choose an uplink"),
        Line::from("d        disable it (asks first)"),
        Line::from("e        enable it again"),
        Line::from("?        this help       q  quit"),
        Line::from(""),
        Line::from("Any key closes this help."),
    ];
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" Help ")),
        r,
    );
}

fn missing(f: &mut Frame, area: Rect, m: &Model, ui: &Ui) {
    let r = centered(area, 60.min(area.width), 7);
    let why = m.unreachable.as_deref().unwrap_or("not answering");
    f.render_widget(
        Paragraph::new(vec![
            Line::styled(
                "stallnet is not running, retrying",
                Style::default().fg(RED).add_modifier(Modifier::BOLD),
            ),
            Line::from(""),
            Line::from(format!("Looking at {}", ui.socket)),
            Line::from(trunc(why, 56)),
        ])
        .wrap(Wrap { trim: true })
        .block(Block::default().borders(Borders::ALL).title(" stallnet ")),
        r,
    );
    let [_, footer] = Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(area);
    draw_footer(f, footer, ui);
}
