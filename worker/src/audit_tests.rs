use super::*;

fn t(status: &str, marked: bool, code: Option<&str>) -> Finished {
    let error = code.map(|c| json!({"code": c}));
    Finished::new(status.into(), marked, error.as_ref())
}

#[test]
fn the_default_level_audits_errors_marked_aborted_and_doubt_but_not_plain_success() {
    let l = AuditLevel::default();
    assert!(!selected(&l, &t("committed", false, None)));
    assert!(selected(&l, &t("committed", true, None)));
    assert!(selected(&l, &t("rolled_back", false, Some("boom"))));
    assert!(selected(
        &l,
        &t("rolled_back", false, Some("rollback_failed"))
    ));
    assert!(!procedures_selected(&l, &t("committed", false, None)));
    assert!(procedures_selected(&l, &t("rolled_back", false, Some("x"))));
}

#[test]
fn all_overrides_everything_and_successful_adds_successes() {
    let mut l = AuditLevel {
        with_errors: false,
        marked_for_audit: false,
        aborted: false,
        in_doubt: false,
        ..AuditLevel::default()
    };
    assert!(!selected(&l, &t("rolled_back", true, Some("x"))));
    l.successful = true;
    assert!(selected(&l, &t("committed", false, None)));
    let all = AuditLevel { all: true, ..l };
    assert!(selected(&all, &t("rolled_back", false, None)));
}
