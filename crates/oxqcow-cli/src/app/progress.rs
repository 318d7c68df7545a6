//! The `-p` progress display of qemu-img: lines of the form
//! `    (12.34/100%)` ending in a carriage return, printed on stdout whether
//! or not it is a terminal, and a final newline.
//!
//! The decision of when to print follows qemu's `qemu_progress_print`
//! (single precision arithmetic, a minimum step between two prints, always
//! print 0 and 100); indicatif renders the line through a terminal adapter
//! that writes exactly the lines qemu-img writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike};

/// Positions are hundredths of a percent scaled by this, so the bar holds
/// the exact single precision value qemu would print.
const SCALE: f64 = 1e6;

/// qemu's progress state.
struct State {
    current: f32,
    last_print: f32,
}

/// A progress display; a disabled one prints nothing.
pub struct Progress {
    bar: Option<ProgressBar>,
    wanted: Arc<AtomicU64>,
    min_skip: f32,
    state: Mutex<State>,
}

impl Progress {
    /// A progress display printing only when moved by more than `min_skip`
    /// percent (qemu uses 2.0 for compare, 1.0 for convert).
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        let wanted = Arc::new(AtomicU64::new(0));
        let bar = enabled.then(|| {
            let term = QemuLine { wanted: wanted.clone(), written: AtomicU64::new(0) };
            let bar =
                ProgressBar::with_draw_target(Some(100 * SCALE as u64), ProgressDrawTarget::term_like(Box::new(term)));
            let style = ProgressStyle::with_template("    ({qemu_percent}/100%)")
                .expect("the template is valid")
                .with_key("qemu_percent", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.2}", s.pos() as f64 / SCALE);
                });
            bar.set_style(style);
            bar
        });
        Progress { bar, wanted, min_skip, state: Mutex::new(State { current: 0.0, last_print: 0.0 }) }
    }

    /// qemu's `qemu_progress_print(delta, max)`: with `max == 0` the new
    /// value is `delta`, else the value grows by `delta / 100 * max`.
    pub fn print(&self, delta: f32, max: i32) {
        let Some(bar) = &self.bar else { return };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let current = if max == 0 { delta } else { st.current + delta / 100.0 * max as f32 };
        st.current = current;
        if current > st.last_print + self.min_skip
            || current < st.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            st.last_print = current;
            self.wanted.fetch_add(1, Ordering::AcqRel);
            bar.set_position((f64::from(current) * SCALE) as u64);
            // Draws when set_position was rate limited; a repeated draw of a
            // line already written is dropped by the adapter.
            bar.tick();
        }
    }

    /// qemu's `qemu_progress_end`: the closing newline.
    pub fn end(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            // Unflushed, as qemu's progress_simple_end leaves it.
            print!("\n");
        }
    }
}

/// The terminal adapter: writes each rendered line followed by `\r`, once
/// per print qemu would make, and ignores cursor movement, clearing and the
/// padding indicatif adds to fill a terminal's width.
#[derive(Debug)]
struct QemuLine {
    wanted: Arc<AtomicU64>,
    written: AtomicU64,
}

impl TermLike for QemuLine {
    fn width(&self) -> u16 {
        80
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        if s.trim().is_empty() {
            return Ok(());
        }
        let wanted = self.wanted.load(Ordering::Acquire);
        if self.written.swap(wanted, Ordering::AcqRel) == wanted {
            return Ok(());
        }
        // qemu's progress line is a printf and an fflush.
        print!("{s}\r");
        super::stdout::flush();
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        super::stdout::flush();
        Ok(())
    }
}
