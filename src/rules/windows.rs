//! Time intervals (`[time_intervals.<name>]`), Alertmanager's: recurring windows of weekdays,
//! times of day, days of the month and months in a time zone. A route is quiet during the
//! windows it names in `mute_during`, and outside those in `active_during`. Pure: a window
//! is asked about an instant, and answers by that instant's wall-clock time where it applies,
//! so a daylight-saving change moves the window with the local clock, as people expect.
//!
//! Every field given must match (an empty one matches always), as in Alertmanager: "weekdays
//! 18:00 to 08:00" is one window, "weekends" another, and `mute_during` lists both for
//! "out of hours". A time range whose end is before its start wraps past midnight.

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _, ZonedDateTime};
use serde::Deserialize;

/// A time interval as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Times of day, `{ start = "18:00", end = "08:00" }`: from the start, up to the end.
    #[serde(default)]
    pub times: Vec<TimesSpec>,
    /// `"monday"`, or a range `"monday:friday"`.
    #[serde(default)]
    pub weekdays: Vec<String>,
    /// `"1"`, `"1:7"`; negative counts from the month's end (`"-1"` is its last day).
    #[serde(default)]
    pub days_of_month: Vec<String>,
    /// `"january"`, `"december:february"`, or numbers (`"1:3"`).
    #[serde(default)]
    pub months: Vec<String>,
    /// An IANA time zone (`"Europe/Berlin"`); UTC when absent.
    pub location: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimesSpec {
    pub start: String,
    pub end: String,
}

/// A compiled time interval.
#[derive(Debug, Clone)]
pub struct Window {
    pub name: String,
    /// Minutes of the day, `[start, end)`; wrapping past midnight when `end <= start`.
    times: Vec<(u16, u16)>,
    /// Bit `n` for the weekday `n` days after Monday; every bit when none was given.
    weekdays: u8,
    /// Inclusive ranges; negative from the month's end.
    days: Vec<(i8, i8)>,
    /// Bit `n` for month `n` (1 to 12); every bit when none was given.
    months: u16,
    pub zone: TimeZone,
    pub location: String,
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];
/// How far ahead [`Window::next_change`] looks: past a leap year, so a window of one day a
/// year (`months = ["february"], days_of_month = ["29"]` aside) is found.
const HORIZON_DAYS: i64 = 400;

impl Window {
    /// # Errors
    /// Every problem, as its key path and what is wrong.
    pub fn compile(name: &str, spec: &WindowSpec) -> Result<Self, Vec<(String, String)>> {
        let at = format!("time_intervals.{name}");
        let mut problems = Vec::new();
        let mut times = Vec::new();
        for (i, range) in spec.times.iter().enumerate() {
            let start = minute_of_day(&range.start, false);
            let end = minute_of_day(&range.end, true);
            match (start, end) {
                (Ok(start), Ok(end)) if start == end => problems.push((
                    format!("{at}.times[{i}]"),
                    "start and end are the same time: the range is empty".to_owned(),
                )),
                (Ok(start), Ok(end)) => times.push((start, end)),
                (start, end) => {
                    if let Err(err) = start {
                        problems.push((format!("{at}.times[{i}].start"), err));
                    }
                    if let Err(err) = end {
                        problems.push((format!("{at}.times[{i}].end"), err));
                    }
                }
            }
        }
        let mut weekdays = 0u8;
        for (i, text) in spec.weekdays.iter().enumerate() {
            match range(text, |t| named(t, &WEEKDAYS, false)) {
                Ok((from, to)) => weekdays |= bits(from, to, 0, 7) as u8,
                Err(err) => problems.push((format!("{at}.weekdays[{i}]"), err)),
            }
        }
        let mut days = Vec::new();
        for (i, text) in spec.days_of_month.iter().enumerate() {
            match range(text, day_of_month) {
                Ok((from, to)) if (from < 0) == (to < 0) && from <= to => {
                    days.push((from as i8, to as i8));
                }
                Ok(_) => problems.push((
                    format!("{at}.days_of_month[{i}]"),
                    format!("{text:?}: a range goes forward, both ends counted from the same end of the month"),
                )),
                Err(err) => problems.push((format!("{at}.days_of_month[{i}]"), err)),
            }
        }
        let mut months = 0u16;
        for (i, text) in spec.months.iter().enumerate() {
            match range(text, |t| named(t, &MONTHS, true)) {
                Ok((from, to)) => months |= bits(from, to, 0, 12) as u16,
                Err(err) => problems.push((format!("{at}.months[{i}]"), err)),
            }
        }
        let location = spec.location.clone().unwrap_or_else(|| "UTC".to_owned());
        let zone = match TimeZone::get(&location) {
            Ok(zone) => Some(zone),
            Err(err) => {
                problems.push((
                    format!("{at}.location"),
                    format!("{location:?} is not a known IANA time zone ({err})"),
                ));
                None
            }
        };
        match zone {
            Some(zone) if problems.is_empty() => Ok(Self {
                name: name.to_owned(),
                times,
                weekdays: if spec.weekdays.is_empty() {
                    0x7f
                } else {
                    weekdays
                },
                days,
                months: if spec.months.is_empty() {
                    0xfff
                } else {
                    months
                },
                zone,
                location,
            }),
            _ => Err(problems),
        }
    }

    /// Whether `at` falls in the window, by the wall clock of its location.
    pub fn contains(&self, at: Timestamp) -> bool {
        self.contains_local(&at.to_zoned_datetime(self.zone.clone()))
    }

    fn contains_local(&self, local: &ZonedDateTime) -> bool {
        let weekday = local.weekday().to_monday_zero_offset();
        if self.weekdays & (1 << weekday) == 0 {
            return false;
        }
        let month = local.month() - 1;
        if self.months & (1 << month) == 0 {
            return false;
        }
        if !self.days.is_empty() {
            let (day, last) = (local.day(), local.days_in_month());
            let on = |d: i8| if d < 0 { last + 1 + d } else { d };
            if !self
                .days
                .iter()
                .any(|&(from, to)| (on(from)..=on(to)).contains(&day))
            {
                return false;
            }
        }
        if self.times.is_empty() {
            return true;
        }
        let minute =
            u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
        self.times.iter().any(|&(start, end)| {
            if start < end {
                (start..end).contains(&minute)
            } else {
                minute >= start || minute < end
            }
        })
    }

    /// When the window next opens or closes after `at`, if it does within about a year.
    /// Only a minute at which a range starts or ends, or a local midnight, can change it:
    /// those are tried in order.
    pub fn next_change(&self, at: Timestamp) -> Option<Timestamp> {
        let now = self.contains(at);
        let local = at.to_zoned_datetime(self.zone.clone());
        let today = local.date();
        let mut marks: Vec<u16> = self.times.iter().flat_map(|&(s, e)| [s, e]).collect();
        marks.push(0);
        marks.sort_unstable();
        marks.dedup();
        for day in 0..HORIZON_DAYS {
            let Ok(date) = today.checked_add(day.days()) else {
                return None;
            };
            for &minute in &marks {
                let time = jiff::civil::Time::new(
                    i8::try_from(minute / 60).unwrap_or(0),
                    i8::try_from(minute % 60).unwrap_or(0),
                    0,
                    0,
                );
                let Ok(time) = time else { continue };
                // A time the clocks skip (a spring-forward gap) is when the clocks resume.
                let Ok(candidate) = date.to_datetime(time).to_zoned_datetime(self.zone.clone())
                else {
                    continue;
                };
                let instant = candidate.timestamp();
                if instant > at && self.contains(instant) != now {
                    return Some(instant);
                }
            }
        }
        None
    }
}

/// `"HH:MM"` as minutes of the day; `"24:00"` only as an end.
fn minute_of_day(text: &str, end: bool) -> Result<u16, String> {
    let parsed = text.split_once(':').and_then(|(h, m)| {
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        let fits = text.len() == 5 && m < 60 && (h < 24 || (end && h == 24 && m == 0));
        fits.then_some(h * 60 + m)
    });
    parsed.ok_or_else(|| format!("{text:?} is not a time of day as HH:MM (00:00 to 24:00)"))
}

/// `"a"` or `"a:b"`, each end read by `one`.
fn range(text: &str, one: impl Fn(&str) -> Result<i32, String>) -> Result<(i32, i32), String> {
    match text.split_once(':') {
        Some((from, to)) => Ok((one(from.trim())?, one(to.trim())?)),
        None => one(text.trim()).map(|n| (n, n)),
    }
}

/// A weekday or month by name (`names`' index), or a month by number.
fn named(text: &str, names: &[&str], numbers: bool) -> Result<i32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = names.iter().position(|name| *name == lower) {
        return Ok(i32::try_from(i).unwrap_or(0));
    }
    if numbers
        && let Ok(n) = text.parse::<i32>()
        && (1..=i32::try_from(names.len()).unwrap_or(0)).contains(&n)
    {
        return Ok(n - 1);
    }
    Err(format!(
        "{text:?} is not one of {}{}",
        names.join(", "),
        if numbers { " (or 1 to 12)" } else { "" }
    ))
}

fn day_of_month(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(n) if (1..=31).contains(&n) || (-31..=-1).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a day of the month (1 to 31, or -1 for the last day)"
        )),
    }
}

/// The bits `from` to `to` of a cycle of `len`, wrapping (`"saturday:monday"`).
fn bits(from: i32, to: i32, base: i32, len: i32) -> u32 {
    let mut mask = 0;
    let mut n = from - base;
    loop {
        mask |= 1 << n;
        if n == to - base {
            return mask;
        }
        n = (n + 1) % len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(spec: &str) -> Window {
        Window::compile("w", &parse(spec)).unwrap()
    }

    fn parse(spec: &str) -> WindowSpec {
        use figment::providers::Format as _;
        figment::Figment::from(figment::providers::Toml::string(spec))
            .extract()
            .unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn every_field_given_must_match_and_times_wrap_past_midnight() {
        let nights = window(
            r#"times = [{ start = "18:00", end = "08:00" }]
               weekdays = ["monday:friday"]
               location = "Europe/Berlin""#,
        );
        // Monday 2026-12-07, Berlin is UTC+1 in winter.
        assert!(nights.contains(at("2026-12-07T17:00:00Z"))); // 18:00 local
        assert!(!nights.contains(at("2026-12-07T16:59:00Z")));
        assert!(nights.contains(at("2026-12-08T06:59:00Z"))); // Tuesday 07:59
        assert!(!nights.contains(at("2026-12-08T07:00:00Z"))); // 08:00: the end is out
        // Saturday 2026-12-12 at 20:00: not a weekday in the list.
        assert!(!nights.contains(at("2026-12-12T19:00:00Z")));
        let weekends = window(r#"weekdays = ["saturday", "sunday"]"#);
        assert!(weekends.contains(at("2026-12-12T00:00:00Z")));
        assert!(!weekends.contains(at("2026-12-14T00:00:00Z")));
        let wrapping = window(r#"weekdays = ["saturday:monday"]"#);
        assert!(wrapping.contains(at("2026-12-14T12:00:00Z")));
        assert!(!wrapping.contains(at("2026-12-15T12:00:00Z")));
    }

    #[test]
    fn days_of_month_count_from_either_end_and_months_by_name_or_number() {
        let last = window(r#"days_of_month = ["-1"]"#);
        assert!(last.contains(at("2027-02-28T12:00:00Z")));
        assert!(!last.contains(at("2027-02-27T12:00:00Z")));
        assert!(last.contains(at("2028-02-29T12:00:00Z")), "a leap year");
        let first_week = window(
            r#"days_of_month = ["1:7"]
                                   months = ["december", "1:2"]"#,
        );
        assert!(first_week.contains(at("2026-12-07T12:00:00Z")));
        assert!(!first_week.contains(at("2026-12-08T12:00:00Z")));
        assert!(first_week.contains(at("2027-02-01T12:00:00Z")));
        assert!(!first_week.contains(at("2027-03-01T12:00:00Z")));
    }

    /// On 2027-03-28 Berlin's clocks go from 02:00 to 03:00: a window of 01:00 to 04:00 local
    /// is two hours long that night, and three the night after.
    #[test]
    fn a_window_follows_the_local_clock_across_a_dst_change() {
        let night = window(
            r#"times = [{ start = "01:00", end = "04:00" }]
               location = "Europe/Berlin""#,
        );
        assert!(!night.contains(at("2027-03-27T23:59:00Z"))); // 00:59 CET
        assert!(night.contains(at("2027-03-28T00:00:00Z"))); // 01:00 CET
        assert!(night.contains(at("2027-03-28T01:59:00Z"))); // 03:59 CEST
        assert!(!night.contains(at("2027-03-28T02:00:00Z"))); // 04:00 CEST
        assert_eq!(
            night.next_change(at("2027-03-27T12:00:00Z")),
            Some(at("2027-03-28T00:00:00Z"))
        );
        assert_eq!(
            night.next_change(at("2027-03-28T00:30:00Z")),
            Some(at("2027-03-28T02:00:00Z"))
        );
        // The night after: 01:00 CEST is 23:00 UTC.
        assert_eq!(
            night.next_change(at("2027-03-28T12:00:00Z")),
            Some(at("2027-03-28T23:00:00Z"))
        );
        // A window that never changes says so.
        assert_eq!(window("").next_change(at("2027-03-28T12:00:00Z")), None);
    }

    #[test]
    fn mistakes_name_the_key_and_the_value() {
        let spec = parse(
            r#"times = [{ start = "25:00", end = "8:00" }, { start = "09:00", end = "09:00" }]
               weekdays = ["funday"]
               days_of_month = ["0", "-1:3"]
               months = ["13"]
               location = "Mars/Olympus""#,
        );
        let problems = Window::compile("oops", &spec).unwrap_err();
        let text: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        let text = text.join("\n");
        for expected in [
            "time_intervals.oops.times[0].start: \"25:00\" is not a time of day",
            "time_intervals.oops.times[0].end: \"8:00\"",
            "time_intervals.oops.times[1]: start and end are the same time",
            "time_intervals.oops.weekdays[0]: \"funday\" is not one of monday",
            "time_intervals.oops.days_of_month[0]: \"0\" is not a day of the month",
            "time_intervals.oops.days_of_month[1]: \"-1:3\": a range goes forward",
            "time_intervals.oops.months[0]: \"13\" is not one of january",
            "time_intervals.oops.location: \"Mars/Olympus\" is not a known IANA time zone",
        ] {
            assert!(text.contains(expected), "{expected}\n--\n{text}");
        }
    }
}
