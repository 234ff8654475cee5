//! stallnet's operator dashboard, a client of the daemon's control API.
//!
//! - [`model`]: what is shown, derived from the API's documents (pure, testable).
//! - [`view`]: drawing it with ratatui.
//! - [`render_text`]: one frame as plain text (`--once`, snapshot tests).

pub mod model;
pub mod view;

use ratatui::backend::TestBackend;
use ratatui::Terminal;

/// One frame of `width`×`height` as text lines (trailing spaces trimmed).
pub fn render_text(m: &model::Model, ui: &view::Ui, width: u16, height: u16) -> String {
    let Ok(mut t) = Terminal::new(TestBackend::new(width, height));
    if t.draw(|f| view::draw(f, m, ui)).is_err() {
        return String::new();
    }
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let mut line = String::new();
        for x in 0..width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
