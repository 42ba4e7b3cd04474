use super::*;
use figment::Jail;

#[test]
fn defaults_work_on_one_machine() {
    let cfg = Config::default();
    assert_eq!(cfg.queue_manager.listen.to_string(), "127.0.0.1:8080");
    assert!(cfg.database.url.expose().contains("127.0.0.1"));
    assert_eq!(cfg.amqp.prefix, "provisio");
}

#[test]
fn env_overrides_file_and_secrets_are_masked() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "p.toml",
            "[amqp]\nprefix = \"fromfile\"\n[engine]\nprefetch = 7\n",
        )?;
        jail.set_env("PROVISIO_AMQP__PREFIX", "fromenv");
        jail.set_env("PROVISIO_BOOTSTRAP_ADMIN_KEY", "hunter2");
        let cfg = Config::load(Some(Path::new("p.toml"))).expect("loads");
        assert_eq!(cfg.amqp.prefix, "fromenv");
        assert_eq!(cfg.engine.prefetch, 7);
        assert_eq!(cfg.security.bootstrap_admin_key.expose(), "hunter2");
        let shown = cfg.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("********"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        Ok(())
    });
}

#[test]
fn unrelated_provisio_variables_are_ignored_but_typos_in_sections_are_not() {
    Jail::expect_with(|jail| {
        jail.set_env("PROVISIO_TEST_PG", "postgres://x");
        jail.set_env("PROVISIO_URL", "http://x");
        assert!(Config::load(None).is_ok());
        jail.set_env("PROVISIO_ENGINE__PREFECH", "3");
        assert!(Config::load(None).is_err());
        Ok(())
    });
}

#[test]
fn secrets_in_the_file_are_refused() {
    Jail::expect_with(|jail| {
        jail.create_file("p.toml", "[security]\nsigning_key = \"oops\"\n")?;
        let err = Config::load(Some(Path::new("p.toml"))).expect_err("refused");
        assert!(matches!(err, ConfigError::InlineSecret { .. }), "{err}");
        Ok(())
    });
}

#[test]
fn secret_files_are_read() {
    Jail::expect_with(|jail| {
        jail.create_file("key", "s3cret\n")?;
        jail.set_env("PROVISIO_SECURITY__SIGNING_KEY_FILE", "key");
        let cfg = Config::load(None).expect("loads");
        assert_eq!(cfg.security.signing_key.expose(), "s3cret");
        Ok(())
    });
}

#[test]
fn txlog_servers_come_from_the_environment_as_a_list_or_commas() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "PROVISIO_TXLOG__SERVERS",
            "[postgres://a:5432/x, \"postgres://b/y\"]",
        );
        let cfg = Config::load(None).expect("loads");
        let got: Vec<&str> = cfg.txlog.servers.iter().map(Secret::expose).collect();
        assert_eq!(got, ["postgres://a:5432/x", "postgres://b/y"]);
        jail.set_env(
            "PROVISIO_TXLOG__SERVERS",
            "postgres://u:pw@10.0.0.1:5432/x, postgres://b/y",
        );
        let cfg = Config::load(None).expect("loads");
        let got: Vec<&str> = cfg.txlog.servers.iter().map(Secret::expose).collect();
        assert_eq!(got, ["postgres://u:pw@10.0.0.1:5432/x", "postgres://b/y"]);
        assert!(!cfg.to_masked_toml().contains("pw@"));
        jail.set_env("PROVISIO_TXLOG__SERVERS", "postgres://only/one");
        let cfg = Config::load(None).expect("loads");
        assert_eq!(cfg.txlog_servers().len(), 1);
        Ok(())
    });
}

#[test]
fn http_services_must_be_on_the_allow_list() {
    Jail::expect_with(|jail| {
        jail.set_env(
            "PROVISIO_PROVIDERS__HTTP__SERVICES__CRM__BASE_URL",
            "https://CRM.example.com/api",
        );
        assert!(Config::load(None).is_ok(), "no list: any host");
        jail.set_env(
            "PROVISIO_PROVIDERS__HTTP__ALLOWED_HOSTS",
            "[crm.example.com, \"[::1]\"]",
        );
        let cfg = Config::load(None).expect("listed host (case-insensitive)");
        assert_eq!(cfg.providers.http.allowed_hosts.len(), 2);
        let v6 = url::Url::parse("http://[::1]:8080/").expect("url");
        assert!(cfg.providers.http.host_allowed(&v6));
        jail.set_env(
            "PROVISIO_PROVIDERS__HTTP__SERVICES__CRM__BASE_URL",
            "https://evil.example/api",
        );
        let err = Config::load(None).expect_err("unlisted host");
        assert!(err.to_string().contains("allowed_hosts"), "{err}");
        Ok(())
    });
}

#[test]
fn txlog_sizes_and_timeouts_must_be_positive() {
    Jail::expect_with(|jail| {
        for key in [
            "PROVISIO_TXLOG__POOL_SIZE",
            "PROVISIO_TXLOG__TIMEOUT_SECONDS",
            "PROVISIO_TXLOG__PROBE_INTERVAL_MS",
        ] {
            jail.set_env(key, "0");
            let err = Config::load(None).expect_err(key);
            assert!(err.to_string().contains("at least 1"), "{err}");
            jail.set_env(key, "1");
        }
        assert!(Config::load(None).is_ok());
        Ok(())
    });
}

#[test]
fn rate_limits_are_off_by_default_and_checked() {
    Jail::expect_with(|jail| {
        let cfg = Config::load(None).expect("defaults");
        assert_eq!(cfg.queue_manager.rate_limit.period(), None);
        jail.set_env(
            "PROVISIO_QUEUE_MANAGER__RATE_LIMIT__PER_PRINCIPAL_PER_SECOND",
            "0.5",
        );
        let cfg = Config::load(None).expect("valid");
        let rl = &cfg.queue_manager.rate_limit;
        assert_eq!(rl.period(), Some(std::time::Duration::from_secs(2)));
        assert_eq!(rl.effective_burst(), 1);
        jail.set_env("PROVISIO_QUEUE_MANAGER__RATE_LIMIT__BURST", "20");
        let cfg = Config::load(None).expect("valid");
        assert_eq!(cfg.queue_manager.rate_limit.effective_burst(), 20);
        for bad in ["-1", "1e-300"] {
            jail.set_env(
                "PROVISIO_QUEUE_MANAGER__RATE_LIMIT__PER_PRINCIPAL_PER_SECOND",
                bad,
            );
            assert!(Config::load(None).is_err(), "{bad}");
        }
        Ok(())
    });
}

#[test]
fn http_base_urls_are_plain_http_urls() {
    let mut cfg = HttpProviderConfig::default();
    for bad in [
        "ftp://h/",
        "https://u:p@h/",
        "https://h/api?x=1",
        "https://h/#f",
        "h/api",
    ] {
        cfg.services.insert(
            "s".into(),
            HttpService {
                base_url: bad.into(),
                ..HttpService::default()
            },
        );
        assert!(cfg.base_url("s").is_err(), "{bad}");
    }
}

#[test]
fn unknown_keys_and_bad_values_are_errors() {
    Jail::expect_with(|jail| {
        jail.create_file("p.toml", "[amqp]\nprefixx = \"x\"\n")?;
        assert!(Config::load(Some(Path::new("p.toml"))).is_err());
        jail.create_file("q.toml", "[amqp]\nprefix = \"a b\"\n")?;
        assert!(Config::load(Some(Path::new("q.toml"))).is_err());
        Ok(())
    });
}
