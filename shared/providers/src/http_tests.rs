use super::*;

#[test]
fn compensating_calls_can_use_the_answer() {
    let c = json!({"method": "DELETE", "path": "/accounts/{response.id}", "body": {"n": "{response.n}"}});
    let filled = fill(&c, &json!({"id": "a1", "n": 3}));
    assert_eq!(
        filled,
        json!({"method": "DELETE", "path": "/accounts/a1", "body": {"n": "3"}})
    );
}

#[test]
fn plain_paths_resolve_under_the_base() {
    let base = |u: &str| Url::parse(u).expect("url");
    let cases = [
        (
            "http://h:8080/api/",
            "/accounts",
            "http://h:8080/api/accounts",
        ),
        ("http://h:8080/api/", "/", "http://h:8080/api/"),
        ("http://h/", "/a/b?q=x%20y", "http://h/a/b?q=x%20y"),
        ("http://h/", "/urn:x", "http://h/urn:x"),
        ("http://h/", "/files/a..b/./c", "http://h/files/a..b/c"),
        ("http://h/", "/%2e/x", "http://h/x"),
    ];
    for (b, path, want) in cases {
        let got = resolve(&base(b), path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(got.as_str(), want, "{b} + {path}");
    }
}

#[test]
fn every_escape_is_refused_as_invalid_path() {
    let base = Url::parse("http://svc.example:8080/api/").expect("url");
    for bad in [
        // Not an absolute path, or a host in disguise.
        "users",
        "//evil.example/x",
        "http://evil.example/x",
        "https://svc.example:8080/api/x",
        "/x?u=http://e",
        "/\\evil.example/x",
        "/a\\..\\..\\b",
        // `..`, plain and encoded.
        "/a/../../b",
        "/..",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/.%2e/admin",
        "/%2e./admin",
        "/..%2fadmin",
        "/..%2Fadmin",
        "/a/%2e%2e%2f%2e%2e%2fadmin",
        "/%252e%252e/admin",
        "/%25252e%25252e/admin",
        "/..;/admin",
        "/..%3b/admin",
        // Control characters, plain and encoded.
        "/a\nb",
        "/a%0d%0aHost:%20evil",
        "/a%00b",
    ] {
        let err = resolve(&base, bad).expect_err(bad);
        assert_eq!(err.code, "invalid_path", "{bad}: {err}");
        assert!(!err.retryable, "{bad}");
    }
}

#[test]
fn only_urls_under_the_base_are_under_it() {
    let base = Url::parse("http://h:8080/api/").expect("url");
    let under = |u: &str| is_under(&base, &Url::parse(u).expect("url"));
    assert!(under("http://h:8080/api/"));
    assert!(under("http://h:8080/api/x/y"));
    for out in [
        "http://h:8080/apix",
        "http://h:8080/",
        "http://h:8081/api/x",
        "https://h:8080/api/x",
        "http://evil:8080/api/x",
        "http://u:p@h:8080/api/x",
    ] {
        assert!(!under(out), "{out}");
    }
}

fn config(base_url: &str, allowed: &[&str]) -> HttpProviderConfig {
    let mut cfg = HttpProviderConfig {
        allowed_hosts: allowed.iter().map(|h| (*h).to_owned()).collect(),
        ..HttpProviderConfig::default()
    };
    cfg.services.insert(
        "svc".into(),
        HttpService {
            base_url: base_url.into(),
            ..HttpService::default()
        },
    );
    cfg
}

#[test]
fn a_service_off_the_allow_list_is_a_configuration_error() {
    assert!(HttpProvider::new(&config("http://127.0.0.1:9/api", &["127.0.0.1"])).is_ok());
    assert!(HttpProvider::new(&config("http://127.0.0.1:9/api", &[])).is_ok());
    let err = HttpProvider::new(&config("http://evil.example/", &["127.0.0.1"]))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("allowed_hosts"), "{err}");
}

#[tokio::test]
async fn a_target_off_the_allow_list_is_refused_before_sending() {
    // Built as start-up would, then the list narrowed: the per-call check still holds.
    let mut p =
        HttpProvider::new(&config("http://127.0.0.1:9/api", &["127.0.0.1"])).expect("valid");
    p.config.allowed_hosts = vec!["10.0.0.1".into()];
    let req = request_of(&json!({"service": "svc", "path": "/x"}), "input").expect("valid");
    let err = p.send(&req, "k").await.expect_err("refused");
    assert_eq!(err.code, "host_not_allowed");
    assert!(!err.retryable);
    let req = Request {
        path: "/%2e%2e/x".into(),
        ..req
    };
    p.config.allowed_hosts.clear();
    let err = p.send(&req, "k").await.expect_err("refused");
    assert_eq!(err.code, "invalid_path");
}
