//! The operator's queries stay index seeks: every statement a command runs is planned without
//! a scan, and the work they do does not grow with the history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::trace::{TraceEvent, TraceEventCodes};
use rusqlite::{StatementStatus, params};

use super::*;
use crate::store::admin::{Filter, RowStatus, Tools};

/// A database with `events` events from two sources: most delivered, some dead, failed,
/// pending, suppressed or unrouted, spread over the whole history.
fn history(events: i64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    let mut conn = Connection::open(&path).unwrap();
    super::super::schema::migrate(&mut conn, &path).unwrap();
    let tx = conn.transaction().unwrap();
    for id in 1..=events {
        let source = if id % 3 == 0 { "scorecard" } else { "cl" };
        let unrouted = (id % 10 == 0).then_some(1);
        tx.execute(
            "INSERT INTO events (id, source, delivery_id, event_type, received_at, payload, unrouted)
             VALUES (?1, ?2, ?3, 'scan.completed', ?4, CAST('{}' AS BLOB), ?5)",
            params![id, source, format!("d{id}"), id * 1000, unrouted],
        )
        .unwrap();
        if unrouted.is_some() {
            continue;
        }
        if id % 40 == 1 {
            tx.execute(
                "INSERT INTO dispatches (event_id, route, status, detail, at)
                 VALUES (?1, 'throttled', 'suppressed', 'key', ?2)",
                params![id, id * 1000],
            )
            .unwrap();
        }
        let (status, quieted_by) = match id % 97 {
            0 => ("dead", None),
            1 => ("failed", None),
            2 => ("pending", None),
            3 => ("silenced", Some("1")),
            4 => ("muted", Some("during nights")),
            _ => ("succeeded", None),
        };
        tx.execute(
            "INSERT INTO jobs (event_id, route, sink, status, attempts, next_attempt_at, created_at, updated_at,
                               quieted_by)
             VALUES (?1, 'all', 'archive', ?2, 1, ?3, ?3, ?3, ?4)",
            params![id, status, id * 1000, quieted_by],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO attempts (job_id, number, started_at, finished_at, outcome)
             VALUES (last_insert_rowid(), 1, ?1, ?1, 'succeeded')",
            [id * 1000],
        )
        .unwrap();
    }
    tx.execute(
        "INSERT INTO silences (route, starts_at, ends_at, comment, author, created_at)
         VALUES ('all', 0, ?1, 'planned', 'alice', 0)",
        [events * 500],
    )
    .unwrap();
    tx.commit().unwrap();
    conn.execute_batch("ANALYZE").unwrap();
    (dir, path)
}

/// What the commands ask: every filter, `--since`, and `show`.
fn every_command(admin: &Tools, events: i64) {
    let mut filters: Vec<Filter> = std::iter::once(None)
        .chain(RowStatus::ALL.map(Some))
        .map(|status| Filter {
            status,
            limit: 20,
            ..Filter::default()
        })
        .collect();
    filters.push(Filter {
        source: Some("scorecard".into()),
        limit: 20,
        ..Filter::default()
    });
    filters.push(Filter {
        since: Some(jiff::Timestamp::from_second(events / 2).unwrap()),
        limit: 20,
        ..Filter::default()
    });
    for filter in &filters {
        let rows = admin.list(filter).unwrap();
        assert!(!rows.is_empty(), "{filter:?} lists nothing");
        if let Some(status) = &filter.status {
            assert!(rows.iter().all(|row| &row.status == status), "{filter:?}");
        }
    }
    for id in [1, events / 2, events] {
        assert!(admin.show(id).unwrap().is_some());
    }
    let (_, silenced) = admin.silence(1, 5).unwrap().unwrap();
    assert_eq!(silenced.len(), 5);
    assert!(silenced.iter().all(|row| row.status == RowStatus::Silenced));
    let now = jiff::Timestamp::from_millisecond(events * 250).unwrap();
    assert_eq!(admin.silences(false, now).unwrap().len(), 1);
    assert!(admin.silences(true, now).unwrap().is_empty());
}

/// Runs `every_command` on a fresh read-only connection, recording each statement it ran and
/// the virtual machine steps each took.
fn traced(path: &std::path::Path, events: i64) -> HashMap<String, i32> {
    let mut admin = Admin::open(path, Access::Read).unwrap();
    let steps: Arc<Mutex<HashMap<String, i32>>> = Arc::default();
    let record = Arc::clone(&steps);
    admin
        .conn
        .trace_v2(
            TraceEventCodes::SQLITE_TRACE_PROFILE,
            Some(move |event: TraceEvent<'_>| {
                if let TraceEvent::Profile(stmt, _) = event {
                    // Cumulative per statement; a cached statement's last count is its total.
                    record.lock().unwrap().insert(
                        stmt.sql().into_owned(),
                        stmt.get_status(StatementStatus::VmStep),
                    );
                }
            }),
        )
        .unwrap();
    let tools = Tools::new(Box::new(admin));
    every_command(&tools, events);
    drop(tools);
    Arc::try_unwrap(steps).unwrap().into_inner().unwrap()
}

#[test]
fn every_statement_of_the_commands_is_an_index_seek() {
    let (_dir, path) = history(2000);
    let statements = traced(&path, 2000);
    assert!(statements.len() >= 12, "{:?}", statements.keys());
    let conn = Connection::open(&path).unwrap();
    for sql in statements.keys().filter(|sql| !sql.starts_with("PRAGMA")) {
        let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let mut steps = explain.raw_query(); // parameters unbound: the plan is for any value
        let mut plan = Vec::new();
        while let Some(row) = steps.next().unwrap() {
            plan.push(row.get::<_, String>(3).unwrap());
        }
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN")),
            "{sql}\n{plan:#?}"
        );
    }
}

/// Ten times the history costs the commands no more than the bisection's few extra steps.
#[test]
fn the_commands_do_as_much_work_on_a_long_history_as_on_a_short_one() {
    let total = |events| -> i64 {
        let (_dir, path) = history(events);
        traced(&path, events).values().map(|&n| i64::from(n)).sum()
    };
    let (short, long) = (total(1_000), total(10_000));
    assert!(
        long * 10 <= short * 12,
        "{short} steps on 1,000 events, {long} on 10,000"
    );
}

/// A read-only command on a database the daemon has not migrated yet says so, and leaves it
/// as it was.
#[test]
fn a_read_refuses_an_unmigrated_database_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(super::super::schema::MIGRATIONS[0])
        .unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    let before = std::fs::read(&path).unwrap();
    let Err(err) = Admin::open(&path, Access::Read) else {
        panic!("opened a version-1 database");
    };
    assert!(
        err.to_string()
            .contains("start the daemon once to migrate it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// Paging by keyset shows every row once, in order, and never splits an event across pages:
/// the pages of any size, put together, are the whole listing.
#[test]
fn pages_put_together_are_the_whole_listing() {
    let (_dir, path) = history(300);
    let tools = Tools::new(Box::new(Admin::open(&path, Access::Read).unwrap()));
    for status in [None, Some(RowStatus::Dead), Some(RowStatus::Suppressed)] {
        let whole = tools
            .list(&Filter {
                status,
                limit: 100_000,
                ..Filter::default()
            })
            .unwrap();
        let key = |row: &Row| {
            (
                row.event_id,
                row.job_id,
                row.route.clone(),
                row.status.as_str(),
            )
        };
        let mut keys: Vec<_> = whole.iter().map(key).collect();
        for size in [1, 7, 64] {
            let (mut paged, mut before, mut pages) = (Vec::new(), None, 0);
            loop {
                let page = tools
                    .page(&Filter {
                        status,
                        before,
                        limit: size,
                        ..Filter::default()
                    })
                    .unwrap();
                // A page holds whole events: more than asked only for one event bigger than it.
                assert!(
                    page.rows.len() <= size
                        || page
                            .rows
                            .iter()
                            .all(|row| row.event_id == page.rows[0].event_id)
                );
                if let (Some(first), Some(last)) = (page.rows.first(), paged.last()) {
                    let last: &Row = last;
                    assert!(
                        first.event_id < last.event_id,
                        "an event split across pages"
                    );
                }
                paged.extend(page.rows);
                pages += 1;
                match page.next {
                    Some(next) => before = Some(next),
                    None => break,
                }
                assert!(pages < 10_000);
            }
            let mut got: Vec<_> = paged.iter().map(key).collect();
            got.sort();
            keys.sort();
            assert_eq!(got, keys, "{status:?} in pages of {size}");
        }
    }
}

/// A page filtered by what no index serves examines a bounded number of rows and says where
/// to go on: a type no event has costs a page the same however long the history, and the
/// cursor walks it to the end.
#[test]
fn a_page_of_a_type_no_event_has_stops_at_its_budget_and_goes_on() {
    let (_dir, path) = history(3_000);
    let tools = Tools::new(Box::new(Admin::open(&path, Access::Read).unwrap()));
    let nothing = || globset::Glob::new("policy.*").unwrap().compile_matcher();
    let (mut before, mut pages) = (None, 0);
    loop {
        let page = tools
            .page(&Filter {
                event_type: Some(nothing()),
                before,
                limit: 20,
                ..Filter::default()
            })
            .unwrap();
        assert!(page.rows.is_empty());
        pages += 1;
        match page.next {
            Some(next) => {
                assert!(
                    before.is_none_or(|before| next < before),
                    "the cursor moves on"
                );
                before = Some(next);
            }
            None => break,
        }
    }
    assert!(
        pages > 2,
        "{pages} pages: the scan stopped at its budget on the way"
    );
    // The command line reads on until it has its rows (here: there are none).
    let listed = tools
        .list(&Filter {
            event_type: Some(nothing()),
            limit: 20,
            ..Filter::default()
        })
        .unwrap();
    assert!(listed.is_empty());
}
