//! The log line: `2026-12-03T08:37:07.681712Z  INFO message key="value" key=value`, the layout
//! of tracing-subscriber's default formatter (full, no target, no colours), written for less.
//!
//! Why not the default: it paints every field name through its colour machinery even with
//! colours off, converts the clock to a civil date for every line and escapes messages one
//! character at a time. In postern-srsd that was a fifth of the CPU of a lookup (9.6 against
//! 7.7 us with logging off). Here the date is formatted once a second, and text is scanned a
//! byte at a time and copied whole when nothing in it needs escaping (the common case).
//!
//! One difference, on purpose: the default writes `%`-formatted and `?`-formatted field values
//! as they are, so a value carrying a newline (say an error quoting what a client sent) could
//! start a forged line. Here control characters are escaped wherever they appear, the way the
//! default escapes them in messages, so every event is exactly one line.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter the daemons install.
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    /// Whether lines start with a UTC timestamp (not under journald, which adds its own).
    pub timestamps: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.timestamps {
            write_timestamp(&mut writer, SystemTime::now())?;
            writer.write_char(' ')?;
        }
        writer.write_str(level_text(*event.metadata().level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut any = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                writer.write_char(':')?;
                any = true;
            }
            if any {
                writer.write_char(' ')?;
            }
        }
        let mut visitor = LineVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        writer.write_char('\n')
    }
}

/// The level as the default formatter pads it.
fn level_text(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS` text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-12-03T08:37:07.681712Z`, RFC 3339 in UTC with microseconds, as the default writes it.
fn write_timestamp(writer: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            text.clear();
            let at = i64::try_from(second)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )?;
            *cached = second;
        }
        writer.write_str(text)
    })?;
    let mut micros = since_epoch.subsec_micros();
    let mut digits = [b'0'; 6];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    writer.write_char('.')?;
    // Six ASCII digits.
    writer.write_str(std::str::from_utf8(&digits).unwrap_or("000000"))?;
    writer.write_char('Z')
}

/// Writes an event's fields: the message bare, the others as `name=value`, space-separated.
struct LineVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl LineVisitor<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of events bridged from the `log` crate, already in the line.
        if name.starts_with("log.") {
            return;
        }
        self.result = (|| {
            if !self.first {
                self.writer.write_char(' ')?;
            }
            self.first = false;
            if name != "message" {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')?;
            }
            value(self.writer)
        })();
    }
}

impl Visit for LineVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, |w| Escaping(w).write_str(value));
        } else {
            self.field(field, |w| write_quoted(w, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let name = field.name();
        self.field(field, |w| {
            write!(Escaping(&mut *w), "{value}")?;
            if let Some(source) = value.source() {
                write!(w, " {name}.sources=")?;
                write!(Escaping(w), "{}", SourceList(source))?;
            }
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| write!(Escaping(w), "{value:?}"));
    }
}

/// An error's causes, `[first, second]`.
struct SourceList<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for SourceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(err) = next {
            list.entry(&format_args!("{err}"));
            next = err.source();
        }
        list.finish()
    }
}

/// A string value as `"..."` with Rust's escapes, which is what `{:?}` writes; plain printable
/// ASCII is copied as it is.
fn write_quoted(writer: &mut impl fmt::Write, value: &str) -> fmt::Result {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        writer.write_char('"')?;
        writer.write_str(value)?;
        writer.write_char('"')
    } else {
        write!(writer, "{value:?}")
    }
}

/// Escapes control characters (C0, DEL, C1) as `\x1b` / `\u{85}`, so that text can neither end
/// the line nor drive a terminal.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

/// Whether a string holds nothing [`Escaping`] changes: no byte below 0x20, no DEL, and no C1
/// control (U+0080..U+009F, in UTF-8 0xC2 0x80..0x9F).
fn is_clean(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20
            || b == 0x7f
            || (b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..0xa0).contains(n)))
    })
}

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if is_clean(text) {
            return self.0.write_str(text);
        }
        for ch in text.chars() {
            match u32::from(ch) {
                code @ (0..0x20 | 0x7f) => write!(self.0, "\\x{code:02x}")?,
                code @ 0x80..0xa0 => write!(self.0, "\\u{{{code:x}}}")?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Outer(#[source] std::io::Error);

    /// Events of every kind the daemons log, through both formatters, without timestamps.
    fn log_samples(ours: bool) -> String {
        let out = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_target(false)
            .without_time();
        let subscriber: Box<dyn Subscriber + Send + Sync> = if ours {
            Box::new(
                builder
                    .event_format(LineFormat { timestamps: false })
                    .finish(),
            )
        } else {
            Box::new(builder.finish())
        };
        tracing::subscriber::with_default(subscriber, || {
            let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 52138));
            tracing::info!(%peer, direction = "forward", from = "user0@sender0.example", to = "SRS0=XEhN=JW=sender0.example=user0@fwd.example", "rewritten");
            tracing::warn!(address = "a \"quoted\" \\ value", reason = %"plain display", "not rewritten");
            tracing::error!(count = 3u64, delta = -2i64, ok = true, ratio = 0.5f64, list = ?vec!["a", "b"], "numbers");
            tracing::debug!(r#type = "raw name", "raw identifiers lose their prefix");
            tracing::trace!("a message alone");
            tracing::info!(message = "message as a field", next = 1);
            tracing::info!("message with a format {} {:?}", 42, "quoted");
            tracing::info!(empty = "", unicode = "é → ☃", "non-ASCII strings");
            let err = Outer(std::io::Error::other("disk full"));
            tracing::warn!(error = &err as &dyn std::error::Error, "with sources");
            tracing::warn!(
                escape = "bell\x07 esc\x1b[31m",
                "controls inside a quoted value"
            );
            tracing::warn!("controls in the message: esc\x1b[31m del\x7f c1\u{85}");
            let span = tracing::info_span!("session", id = 7);
            let _entered = span.enter();
            tracing::info!(inside = true, "in a span");
        });
        out.text()
    }

    #[test]
    fn lines_are_the_default_formatters_lines() {
        let ours = log_samples(true);
        let theirs = log_samples(false);
        assert_eq!(ours, theirs);
        assert_eq!(ours.lines().count(), 12, "{ours}");
        assert!(ours.starts_with(
            " INFO rewritten peer=127.0.0.1:52138 direction=\"forward\" from=\"user0@sender0.example\" to=\"SRS0=XEhN=JW=sender0.example=user0@fwd.example\"\n"
        ), "{ours}");
    }

    #[test]
    fn no_value_can_break_the_line() {
        let out = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .event_format(LineFormat { timestamps: false })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let hostile = "user\r\n2026-01-01T00:00:00.000000Z  INFO forged";
            tracing::warn!(display = %hostile, debug = ?format_args!("{hostile}"), quoted = hostile, "bad input {hostile}");
        });
        let text = out.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            text,
            " WARN bad input user\\x0d\\x0a2026-01-01T00:00:00.000000Z  INFO forged \
             display=user\\x0d\\x0a2026-01-01T00:00:00.000000Z  INFO forged \
             debug=user\\x0d\\x0a2026-01-01T00:00:00.000000Z  INFO forged \
             quoted=\"user\\r\\n2026-01-01T00:00:00.000000Z  INFO forged\"\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut text = String::new();
        let at = UNIX_EPOCH + std::time::Duration::from_micros(1_764_750_427_000_042);
        write_timestamp(&mut text, at).unwrap();
        assert_eq!(text, "2025-12-03T08:27:07.000042Z");
        // The same second again comes from the cache; the next one is formatted anew.
        text.clear();
        write_timestamp(&mut text, at + std::time::Duration::from_millis(999)).unwrap();
        assert_eq!(text, "2025-12-03T08:27:07.999042Z");
        text.clear();
        write_timestamp(&mut text, at + std::time::Duration::from_secs(86_400 * 60)).unwrap();
        assert_eq!(text, "2026-02-01T08:27:07.000042Z");
        // And it is what tracing-subscriber's own clock prints, to the second.
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut Writer::new(&mut theirs),
        )
        .unwrap();
        let mut ours = String::new();
        write_timestamp(&mut ours, SystemTime::now()).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours[..16], theirs[..16], "{ours} / {theirs}");
    }
}
