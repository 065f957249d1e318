//! postgrey's algorithm, pure: triplet keys, sender normalisation, the first-seen/last-seen
//! state machine, the AWL rule and the answer texts. No I/O, no clock: "now" is an argument.

use std::fmt::Write as _;
use std::net::IpAddr;

use sha1::{Digest, Sha1};

/// postgrey's version, as it appears in the default X-Greylist header (`%v`), so that header
/// parsers written for postgrey keep working.
pub const POSTGREY_VERSION: &str = "1.37";

/// Seconds between two AWL count increments for one client (postgrey: one per hour).
pub const AWL_INTERVAL: u64 = 3600;

/// The stored state of a triplet: first seen and last seen, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TripletTimes {
    /// When the triplet was (re)started.
    pub first: u64,
    /// When it was last seen.
    pub last: u64,
}

/// The timing rules a store applies when it records a triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TripletRules {
    /// Greylist delay, seconds.
    pub delay: u64,
    /// The first retry must come within this many seconds of first seen, else the triplet
    /// restarts.
    pub retry_window: u64,
}

/// What recording a triplet found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TripletSeen {
    /// First seen, after the retry-window reset and the future-date clamp.
    pub first: u64,
    /// The triplet had already passed greylisting before this request.
    pub last_was_successful: bool,
}

/// postgrey's state transition for one request: from the stored times (if any) to what this
/// request sees and the times to store (`first`, `now`).
pub fn record_triplet(prev: Option<TripletTimes>, now: u64, rules: TripletRules) -> TripletSeen {
    let Some(prev) = prev else {
        return TripletSeen {
            first: now,
            last_was_successful: false,
        };
    };
    let mut first = prev.first;
    let last_was_successful = prev.last.saturating_sub(prev.first) >= rules.delay;
    if !last_was_successful && now.saturating_sub(first) > rules.retry_window {
        first = now;
    }
    if first > now {
        first = now;
    }
    TripletSeen {
        first,
        last_was_successful,
    }
}

/// The stored AWL state of a client: successful deliveries counted and when last counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCount {
    /// Successful first passes counted (at most one per hour).
    pub count: u64,
    /// When the count last changed.
    pub last: u64,
}

/// postgrey's AWL bump: the new state, or `None` when this request does not count (less than an
/// hour since the last count).
pub fn bump_client(prev: Option<ClientCount>, now: u64) -> Option<ClientCount> {
    match prev {
        None => Some(ClientCount {
            count: 1,
            last: now,
        }),
        Some(prev) if now >= prev.last.saturating_add(AWL_INTERVAL) || prev.last > now => {
            Some(ClientCount {
                count: prev.count + 1,
                last: now,
            })
        }
        Some(_) => None,
    }
}

/// [`push_normalised_sender`] into a string of its own, for the tests: the daemon builds the
/// normalised sender into the triplet key directly.
#[cfg(test)]
fn normalise_sender(sender: &str) -> String {
    let mut out = String::with_capacity(sender.len());
    push_normalised_sender(&mut out, sender);
    out
}

/// postgrey's sender normalisation (`do_sender_substitutions`), appended to `out`: the BATV
/// `prvs=` tag removed, `+extension` stripped, every run of digits standing as a word replaced
/// by `#`. The triplet key is built in one string.
fn push_normalised_sender(out: &mut String, sender: &str) {
    let Some((user, domain)) = sender.split_once('@') else {
        out.push_str(sender);
        return;
    };
    let user = without_batv_tag(user);
    let user = user.split_once('+').map_or(user, |(before, _)| before);
    push_replacing_numbers(out, user);
    out.push('@');
    out.push_str(domain);
}

/// The local part of a BATV address (`prvs=TAG=user` or `prvs=user=TAG`) without its tag;
/// any other local part as it is.
fn without_batv_tag(user: &str) -> &str {
    if !user.starts_with("prvs=") {
        return user;
    }
    let mut parts = user.split('=').skip(1);
    let (Some(first), Some(second), None) = (parts.next(), parts.next(), parts.next()) else {
        return user;
    };
    let tag = |s: &str| {
        s.len() >= 10
            && s.bytes()
                .take(10)
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    if tag(second) && !tag(first) {
        first
    } else {
        second
    }
}

/// Perl's `s/\b\d+\b/#/g`, appended to `out`: a run of digits bounded by non-word characters
/// (or the ends) becomes `#`.
fn push_replacing_numbers(out: &mut String, text: &str) {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut after_word = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() && !after_word {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let (run, after) = rest.split_at(digits);
            if after.chars().next().is_none_or(|next| !is_word(next)) {
                out.push('#');
            } else {
                out.push_str(run);
            }
            after_word = true;
            rest = after;
            continue;
        }
        out.push(c);
        after_word = is_word(c);
        rest = &rest[c.len_utf8()..];
    }
}

/// How a client address becomes the client part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKeying {
    /// IPv4 prefix length (postgrey `--ipv4cidr`, 24).
    pub ipv4_prefix: u8,
    /// IPv6 prefix length (postgrey `--ipv6cidr`, 64).
    pub ipv6_prefix: u8,
    /// Use the whole address (postgrey `--lookup-by-host`).
    pub by_host: bool,
}

/// The client part of the triplet key: the network address after masking, as postgrey prints
/// it (`192.0.2.0`, `2001:db8::`); with `by_host`, the address in CIDR form (`192.0.2.1/32`)
/// as NetAddr::IP stringifies.
pub fn client_net(ip: IpAddr, keying: ClientKeying) -> String {
    if keying.by_host {
        return match ip {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        };
    }
    match ip {
        IpAddr::V4(v4) => {
            let prefix = u32::from(keying.ipv4_prefix.min(32));
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            std::net::Ipv4Addr::from(u32::from(v4) & mask).to_string()
        }
        IpAddr::V6(v6) => {
            let prefix = u32::from(keying.ipv6_prefix.min(128));
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            std::net::Ipv6Addr::from(u128::from(v6) & mask).to_string()
        }
    }
}

/// The client address as postgrey's AWL keys it (`NetAddr::IP->addr`).
pub fn client_awl_key(ip: IpAddr, privacy: bool) -> String {
    let key = ip.to_string();
    if privacy { sha1_hex(&key) } else { key }
}

/// `lc "$client_net/$sender/$recipient"`, SHA-1 hex in privacy mode.
pub fn triplet_key(client_net: &str, sender: &str, recipient: &str, privacy: bool) -> String {
    let mut key = String::with_capacity(client_net.len() + sender.len() + recipient.len() + 2);
    key.push_str(client_net);
    key.push('/');
    push_normalised_sender(&mut key, sender);
    key.push('/');
    key.push_str(recipient);
    if key.is_ascii() {
        key.make_ascii_lowercase();
    } else {
        key = key.to_lowercase();
    }
    if privacy { sha1_hex(&key) } else { key }
}

/// Lower-case hex SHA-1, as Perl's `Digest::SHA::sha1_hex`.
pub fn sha1_hex(text: &str) -> String {
    let digest = Sha1::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The greylist answer: action, then the text with `4.2.0 ` prepended when Postfix sent
/// `etrn_domain` (and the text does not start with a digit), `%s` replaced by the seconds left
/// and `%r` by the recipient domain (each once, as postgrey).
pub fn greylist_answer(
    action: &str,
    text: &str,
    seconds_left: u64,
    recipient: &str,
    has_etrn_domain: bool,
) -> String {
    let domain = recipient.rsplit_once('@').map_or(recipient, |(_, d)| d);
    let mut answer = String::with_capacity(action.len() + text.len() + domain.len() + 32);
    answer.push_str(action);
    answer.push(' ');
    if has_etrn_domain && !text.starts_with(|c: char| c.is_ascii_digit()) {
        answer.push_str("4.2.0 ");
    }
    // postgrey replaces the first `%s`, then the first `%r` in the result: the seconds (digits)
    // never make a `%r`, so one pass replacing the first of each is the same.
    let (mut seconds_due, mut domain_due) = (true, true);
    let mut rest = text;
    while let Some(at) = rest.find('%') {
        let (before, from_percent) = rest.split_at(at);
        answer.push_str(before);
        match from_percent.as_bytes().get(1) {
            Some(b's') if seconds_due => {
                let _ = write!(answer, "{seconds_left}");
                seconds_due = false;
                rest = &from_percent[2..];
            }
            Some(b'r') if domain_due => {
                answer.push_str(domain);
                domain_due = false;
                rest = &from_percent[2..];
            }
            _ => {
                answer.push('%');
                rest = &from_percent[1..];
            }
        }
    }
    answer.push_str(rest);
    answer
}

/// The X-Greylist header: `%t` delay, `%v` version, `%d` date, `%h` host (each once).
pub fn x_greylist_header(template: &str, delay: u64, date: &str, hostname: &str) -> String {
    template
        .replacen("%t", &delay.to_string(), 1)
        .replacen("%v", POSTGREY_VERSION, 1)
        .replacen("%d", date, 1)
        .replacen("%h", hostname, 1)
}

/// `strftime("%a, %d %b %Y %T %Z")` for a Unix time, in UTC.
pub fn rfc2822_utc(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} UTC",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The last message instances that got an X-Greylist header, so that a message with several
/// recipients gets it once (postgrey keeps the last 10 per process; this keeps more, since one
/// process serves many connections at once).
#[derive(Debug)]
pub struct InstanceMemory {
    recent: std::collections::VecDeque<String>,
    capacity: usize,
}

impl InstanceMemory {
    /// Remembers up to `capacity` instances.
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: std::collections::VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// True the first time `instance` is seen (always true without an instance attribute).
    pub fn is_new(&mut self, instance: Option<&str>) -> bool {
        let Some(instance) = instance.filter(|i| !i.is_empty()) else {
            return true;
        };
        if self.recent.iter().any(|seen| seen == instance) {
            return false;
        }
        if self.recent.len() >= self.capacity {
            self.recent.pop_back();
        }
        self.recent.push_front(instance.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: TripletRules = TripletRules {
        delay: 300,
        retry_window: 2 * 86_400,
    };

    #[test]
    fn new_triplet_starts_now() {
        assert_eq!(
            record_triplet(None, 1000, RULES),
            TripletSeen {
                first: 1000,
                last_was_successful: false
            }
        );
    }

    #[test]
    fn early_retry_keeps_first_seen() {
        let prev = TripletTimes {
            first: 1000,
            last: 1000,
        };
        let seen = record_triplet(Some(prev), 1100, RULES);
        assert_eq!(seen.first, 1000);
        assert!(!seen.last_was_successful);
    }

    #[test]
    fn retry_after_window_restarts() {
        let prev = TripletTimes {
            first: 1000,
            last: 1000,
        };
        let seen = record_triplet(Some(prev), 1000 + 2 * 86_400 + 1, RULES);
        assert_eq!(seen.first, 1000 + 2 * 86_400 + 1);
        // Exactly at the window edge it still counts.
        let seen = record_triplet(Some(prev), 1000 + 2 * 86_400, RULES);
        assert_eq!(seen.first, 1000);
    }

    #[test]
    fn passed_triplet_is_never_restarted_by_the_window() {
        let prev = TripletTimes {
            first: 1000,
            last: 1400,
        };
        let seen = record_triplet(Some(prev), 1000 + 30 * 86_400, RULES);
        assert_eq!(seen.first, 1000);
        assert!(seen.last_was_successful);
    }

    #[test]
    fn first_seen_in_the_future_is_clamped() {
        let prev = TripletTimes {
            first: 5000,
            last: 5000,
        };
        let seen = record_triplet(Some(prev), 1000, RULES);
        assert_eq!(seen.first, 1000);
    }

    #[test]
    fn awl_counts_once_an_hour() {
        let one = bump_client(None, 1000).unwrap();
        assert_eq!(
            one,
            ClientCount {
                count: 1,
                last: 1000
            }
        );
        assert_eq!(bump_client(Some(one), 1000 + 3599), None);
        assert_eq!(
            bump_client(Some(one), 1000 + 3600),
            Some(ClientCount {
                count: 2,
                last: 4600
            })
        );
        // A last-count in the future counts again (clock moved back).
        assert_eq!(bump_client(Some(one), 10).map(|c| c.count), Some(2));
    }

    #[test]
    fn sender_normalisation_as_postgrey() {
        for (input, expected) in [
            ("user@example.com", "user@example.com"),
            ("user+ext@example.com", "user@example.com"),
            ("bounce-12345-678@lists.example", "bounce-#-#@lists.example"),
            ("abc123@example.com", "abc123@example.com"),
            ("123@example.com", "#@example.com"),
            ("a.42.b@example.com", "a.#.b@example.com"),
            ("prvs=0123456789=user@example.com", "user@example.com"),
            ("prvs=user=0123456789@example.com", "user@example.com"),
            (
                "prvs=abcdefghij=klmnopqrst@example.com",
                "klmnopqrst@example.com",
            ),
            ("prvs=x@example.com", "prvs=x@example.com"),
            ("", ""),
            ("no-at-sign", "no-at-sign"),
            ("list+12@example.com", "list@example.com"),
            ("prvs=a=b=c@example.com", "prvs=a=b=c@example.com"),
            ("1a-2_3-b4-5@example.com", "1a-2_3-b4-#@example.com"),
            ("7-8.9@example.com", "#-#.#@example.com"),
            (
                "\u{e9}12-12\u{e9}-12@example.com",
                "\u{e9}12-12\u{e9}-#@example.com",
            ),
            ("\u{665}12@example.com", "\u{665}12@example.com"),
            ("caf\u{e9}-2024@example.com", "caf\u{e9}-#@example.com"),
        ] {
            assert_eq!(normalise_sender(input), expected, "{input}");
        }
    }

    #[test]
    fn keys_as_postgrey() {
        let keying = ClientKeying {
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            by_host: false,
        };
        let v4: IpAddr = "192.168.0.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(client_net(v4, keying), "192.168.0.0");
        assert_eq!(client_net(v6, keying), "2001:db8:1:2::");
        assert_eq!(
            client_net(
                v4,
                ClientKeying {
                    ipv4_prefix: 16,
                    ..keying
                }
            ),
            "192.168.0.0"
        );
        assert_eq!(
            client_net(
                v4,
                ClientKeying {
                    by_host: true,
                    ..keying
                }
            ),
            "192.168.0.77/32"
        );
        assert_eq!(
            triplet_key("192.168.0.0", "Test@Example.COM", "Test@example.org", false),
            "192.168.0.0/test@example.com/test@example.org"
        );
        assert_eq!(
            triplet_key(
                "192.168.0.0",
                "Bill-7+x@\u{c9}cole.EXAMPLE",
                "\u{c9}T\u{c9}@x.org",
                false
            ),
            "192.168.0.0/bill-#@\u{e9}cole.example/\u{e9}t\u{e9}@x.org"
        );
        assert_eq!(
            triplet_key("192.168.0.0", "a@b", "c@d", true),
            sha1_hex("192.168.0.0/a@b/c@d")
        );
        assert_eq!(sha1_hex("abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(client_awl_key(v4, false), "192.168.0.77");
        assert_eq!(client_awl_key(v4, true), sha1_hex("192.168.0.77"));
    }

    #[test]
    fn answers_as_postgrey() {
        let text = "Greylisted, see http://postgrey.schweikert.ch/help/%r.html";
        assert_eq!(
            greylist_answer("DEFER_IF_PERMIT", text, 300, "x@example.org", true),
            "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"
        );
        assert_eq!(
            greylist_answer("DEFER_IF_PERMIT", text, 300, "x@example.org", false),
            "DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"
        );
        assert_eq!(
            greylist_answer("451", "4.7.1 wait %s s for %r", 42, "x@d.example", true),
            "451 4.7.1 wait 42 s for d.example"
        );
        // Only the first of each is replaced; a lone or doubled % stays.
        assert_eq!(
            greylist_answer(
                "450",
                "%r then %%s, %s, %r %s 100% %",
                7,
                "a@b.example",
                false
            ),
            "450 b.example then %7, %s, %r %s 100% %"
        );
        assert_eq!(greylist_answer("450", "%", 7, "no-at", false), "450 %");
        assert_eq!(
            greylist_answer("450", "%r%s", 7, "no-at", false),
            "450 no-at7"
        );
        assert_eq!(
            x_greylist_header(
                "X-Greylist: delayed %t seconds by postgrey-%v at %h; %d",
                313,
                "Sat, 12 Aug 2023 10:00:00 UTC",
                "mx.example.org"
            ),
            "X-Greylist: delayed 313 seconds by postgrey-1.37 at mx.example.org; Sat, 12 Aug 2023 10:00:00 UTC"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(rfc2822_utc(0), "Thu, 01 Jan 1970 00:00:00 UTC");
        assert_eq!(rfc2822_utc(1_691_834_400), "Sat, 12 Aug 2023 10:00:00 UTC");
        assert_eq!(rfc2822_utc(951_782_400), "Tue, 29 Feb 2000 00:00:00 UTC");
    }

    #[test]
    fn instances_are_remembered() {
        let mut memory = InstanceMemory::new(2);
        assert!(memory.is_new(Some("a")));
        assert!(!memory.is_new(Some("a")));
        assert!(memory.is_new(Some("b")));
        assert!(memory.is_new(Some("c")));
        assert!(memory.is_new(Some("a")), "evicted after capacity");
        assert!(memory.is_new(None));
        assert!(memory.is_new(None));
    }
}
