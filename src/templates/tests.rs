//! The shipped templates on the senders' events, overrides, limits and links.

use super::*;

fn templates() -> Templates {
    let vars = BTreeMap::from([(
        "scan_url".to_owned(),
        "https://cl.example/scans/{scan_id}".to_owned(),
    )]);
    TemplatesBuilder::new(&vars, Path::new(".")).build()
}

fn event(body: &str) -> Event {
    Event::parse("cl", body.as_bytes(), None, None).unwrap()
}

fn fixture(name: &str) -> Event {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Event::parse("src", &std::fs::read(path).unwrap(), None, None).unwrap()
}

#[test]
fn a_link_is_a_plain_web_address_from_the_payload_or_the_scan_report() {
    let scan_url = Some("https://cl.example/scans/{scan_id}?job={job_id}");
    let link = |data: &str| {
        link(
            &event(&format!(r#"{{"type": "x", "data": {data}}}"#)),
            scan_url,
        )
    };
    assert_eq!(
        link(r#"{"url": "https://a.example/f/1", "report_url": "https://a.example/r/1"}"#),
        Some("https://a.example/r/1".into()),
        "the most specific field first"
    );
    assert_eq!(
        link(r#"{"scan_id": 7, "job_id": "j-9"}"#),
        Some("https://cl.example/scans/7?job=j-9".into())
    );
    for refused in [
        r#"{"url": "javascript:alert(1)"}"#,
        r#"{"url": "https://a.example/\"><script>"}"#,
        r#"{"url": "https://a.example/x y"}"#,
        r#"{"url": "https://a.example/|label"}"#,
        r#"{"url": 42}"#,
        r#"{"scan_id": "1 2"}"#,
        r#"[1, 2]"#,
    ] {
        assert_eq!(link(refused), None, "{refused}");
    }
    let none = event(r#"{"type": "x", "data": {"scan_id": 7}}"#);
    assert_eq!(super::link(&none, None), None);
}

#[test]
fn scan_completed_default() {
    let m = templates().render(None, &fixture("compliancelayer-scan.completed.json"), None);
    assert_eq!(
        m.title,
        "Scan completed: example.com graded B (85/100, low risk)"
    );
    assert!(
        m.body
            .contains("8 issues: 0 critical, 2 high, 3 medium, 3 low"),
        "{}",
        m.body
    );
    assert!(m.body.contains("Scan 12345, job 67890"), "{}", m.body);
    assert!(
        m.body.contains("Report: https://cl.example/scans/12345"),
        "{}",
        m.body
    );
}

#[test]
fn an_enriched_scan_lists_its_top_findings_with_their_remediation() {
    // As `enrich::summary` gives it (tested there).
    let report = serde_json::json!({
        "findings_count": 2,
        "top": [{"severity": "critical", "finding": "Telnet open on port 23", "remediation": "Close port 23", "module": "ports"}],
        "link": "https://app.example/r/1"
    });
    let t = templates();
    for name in [
        "compliancelayer-scan.completed.json",
        "compliancelayer-alert.triggered.json",
    ] {
        let m = t.render(None, &fixture(name), Some(&report));
        assert!(
            m.body.contains(
                "Top findings (1 of 2):\n- [CRITICAL] Telnet open on port 23 (ports)\n  Fix: Close port 23\nFull report: https://app.example/r/1"
            ),
            "{name}: {}",
            m.body
        );
        let plain = t.render(None, &fixture(name), None);
        assert!(!plain.body.contains("Top findings"), "{}", plain.body);
    }
}

#[test]
fn every_family_has_a_default() {
    let t = templates();
    let alert = t.render(None, &fixture("compliancelayer-alert.triggered.json"), None);
    assert_eq!(
        alert.title,
        "Alert [HIGH] example.com: Security score dropped from 85 to 61"
    );
    assert!(
        alert.body.contains("Score: 85 -> 61 (threshold 70)"),
        "{}",
        alert.body
    );
    let policy = t.render(None, &fixture("scorecard-policy.published.json"), None);
    assert_eq!(
        policy.title,
        "Policy published: Updated Security Policy (v2.1)"
    );
    assert!(
        policy.body.contains("Published by user789"),
        "{}",
        policy.body
    );
    let assessment = t.render(None, &fixture("scorecard-assessment.completed.json"), None);
    assert_eq!(
        assessment.title,
        "Assessment completed: Q1 2025 Security Assessment (NIST Cybersecurity Framework)"
    );
    assert!(
        assessment.body.contains("score 78.2"),
        "{}",
        assessment.body
    );
    let unknown = t.render(
        None,
        &event(r#"{"type": "domain.verified", "data": {"domain": "x.org"}}"#),
        None,
    );
    assert_eq!(unknown.title, "domain.verified from cl");
    assert_eq!(unknown.body, "domain: x.org");
}

#[test]
fn missing_fields_never_fail() {
    let t = templates();
    for ty in [
        "scan.completed",
        "alert.triggered",
        "policy.rejected",
        "assessment.failed",
        "new.thing",
    ] {
        for body in [
            format!(r#"{{"type": "{ty}"}}"#),
            format!(r#"{{"type": "{ty}", "data": [1]}}"#),
            format!(r#"{{"type": "{ty}", "data": {{"grade": "Z"}}}}"#),
        ] {
            let m = t.render(None, &event(&body), None);
            assert!(!m.title.is_empty(), "{body}");
        }
    }
    let m = t.render(None, &event(r#"{"type": "scan.completed"}"#), None);
    assert_eq!(
        m.title,
        "Scan completed: unknown domain graded ? (?/100, unknown risk)"
    );
}

#[test]
fn templates_from_files_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("t")).unwrap();
    std::fs::write(
        dir.path().join("t/scan.j2"),
        "From a file: {{ data.domain }}\nsecond line",
    )
    .unwrap();
    let mut builder = TemplatesBuilder::new(&BTreeMap::new(), dir.path());
    let file = TemplateSource::File {
        file: "t/scan.j2".into(),
    };
    builder.add_named("from-file", &file).unwrap();
    let id = builder
        .resolve("sink s", &TemplateRef::Named("from-file".into()))
        .unwrap();
    let missing = TemplateRef::Source(TemplateSource::File {
        file: "t/none.j2".into(),
    });
    assert!(
        builder
            .resolve("route r", &missing)
            .unwrap_err()
            .contains("cannot read")
    );
    let m = builder.build().render(
        Some(&id),
        &event(r#"{"type": "x", "data": {"domain": "f.com"}}"#),
        None,
    );
    assert_eq!(
        m,
        Message {
            title: "From a file: f.com".into(),
            body: "second line".into(),
            ..Message::default()
        }
    );
}

#[test]
fn overrides_and_errors() {
    let mut builder = TemplatesBuilder::new(&BTreeMap::new(), Path::new("."));
    builder
        .add_named(
            "short",
            &TemplateSource::Inline {
                text: "{{ data.domain }}: {{ data.grade }}".into(),
            },
        )
        .unwrap();
    let named = builder
        .resolve("sink x", &TemplateRef::Named("short".into()))
        .unwrap();
    assert!(
        builder
            .resolve("sink y", &TemplateRef::Named("nope".into()))
            .unwrap_err()
            .contains("no template named")
    );
    let broken = TemplateRef::Source(TemplateSource::Inline {
        text: "{% if %}".into(),
    });
    assert!(
        builder
            .resolve("route z", &broken)
            .unwrap_err()
            .contains("line 1")
    );
    let failing = TemplateRef::Source(TemplateSource::Inline {
        text: "{{ data.score + 'x' }}".into(),
    });
    let failing = builder.resolve("route w", &failing).unwrap();
    let t = builder.build();
    let e = event(
        r#"{"type": "scan.completed", "data": {"domain": "a.com", "grade": "C", "score": 1}}"#,
    );
    assert_eq!(t.render(Some(&named), &e, None).title, "a.com: C");
    // A template that fails at run time falls back to the generic one, and says so.
    let m = t.render(Some(&failing), &e, None);
    assert_eq!(m.title, "scan.completed from cl");
    assert!(m.fallback.unwrap().contains("inline/route w"));
    assert_eq!(t.render(Some(&named), &e, None).fallback, None);
}

#[test]
fn a_template_is_bounded_in_work_and_output() {
    let mut builder = TemplatesBuilder::new(&BTreeMap::new(), Path::new("."));
    let mut add = |name: &str, text: &str| {
        let source = TemplateSource::Inline { text: text.into() };
        builder.resolve(name, &TemplateRef::Source(source)).unwrap()
    };
    let nested = add(
        "nested",
        "{% for a in data.items %}{% for b in data.items %}{% if a == b %}{% endif %}{% endfor %}{% endfor %}x",
    );
    let huge = add("huge", "{% for a in range(100000) %}0123456789{% endfor %}");
    let modest = add(
        "modest",
        "{% for a in data.items %}{% endfor %}{{ data.items | length }} items",
    );
    let t = builder.build();
    let items: Vec<u32> = (0..2000).collect();
    let body = serde_json::json!({"type": "x.y", "data": {"items": items}}).to_string();
    let e = event(&body);

    let started = std::time::Instant::now();
    let m = t.render(Some(&nested), &e, None);
    assert!(m.fallback.unwrap().contains("instructions"), "out of fuel");
    assert_eq!(m.title, "x.y from cl", "the generic default");
    let m = t.render(Some(&huge), &e, None);
    assert!(m.fallback.unwrap().contains("bytes"), "output bound");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "bounded work, not a 4-million-step loop: {:?}",
        started.elapsed()
    );
    // The bound leaves room for an ordinary loop over a large payload.
    let m = t.render(Some(&modest), &e, None);
    assert_eq!((m.title.as_str(), m.fallback), ("2000 items", None));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_loop_nest_over_any_payload_stays_within_the_bounds(
            depth in 1usize..5,
            items in 0usize..3000,
            width in 0usize..200,
            print in any::<bool>(),
        ) {
            let mut text = String::new();
            for level in 0..depth {
                text += &format!("{{% for x{level} in data.items %}}");
            }
            if print {
                text += "{{ data.items }}";
            }
            text += &"{% endfor %}".repeat(depth);
            let mut builder = TemplatesBuilder::new(&BTreeMap::new(), Path::new("."));
            let id = builder
                .resolve("t", &TemplateRef::Source(TemplateSource::Inline { text }))
                .unwrap();
            let t = builder.build();
            let items: Vec<String> = (0..items).map(|i| format!("{i:0width$}")).collect();
            let body = serde_json::json!({"type": "x", "data": {"items": items}}).to_string();
            let m = t.render(Some(&id), &event(&body), None);
            prop_assert!(m.title.len() + m.body.len() <= OUTPUT_LIMIT);
            if let Some(why) = &m.fallback {
                prop_assert!(why.contains("instructions") || why.contains("bytes"), "{why}");
            }
        }
    }
}
