use super::*;

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().map(|&m| Duration::from_millis(m)).collect()
}

#[test]
fn percentiles_are_nearest_rank() {
    let hundred: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
    assert_eq!(percentile(&hundred, 0.50), Duration::from_millis(50));
    assert_eq!(percentile(&hundred, 0.95), Duration::from_millis(95));
    assert_eq!(percentile(&hundred, 0.99), Duration::from_millis(99));
    // Fewer than 1,000 samples: p99.9 is the largest one.
    assert_eq!(percentile(&hundred, 0.999), Duration::from_millis(100));
    assert_eq!(percentile(&hundred, 1.0), Duration::from_millis(100));
    assert_eq!(percentile(&hundred, 0.0), Duration::from_millis(1));
    assert_eq!(percentile(&ms(&[7]), 0.5), Duration::from_millis(7));
    assert_eq!(percentile(&[], 0.99), Duration::ZERO);

    let thousand: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
    assert_eq!(percentile(&thousand, 0.999), Duration::from_millis(999));
}

#[test]
fn percentiles_sort_their_samples() {
    let p = Percentiles::of(ms(&[40, 10, 30, 20]));
    assert_eq!(
        p,
        Percentiles {
            count: 4,
            p50: 20.0,
            p95: 40.0,
            p99: 40.0,
            p99_9: 40.0,
            max: 40.0
        }
    );
    assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
}

#[test]
fn stat_fields_after_a_name_with_spaces_and_parentheses() {
    let line = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1030 0 0 0 \
                150 37 12 5 20 0 9 0 123456 1000000 2000 18446744073709551615";
    let s = parse_stat(line).expect("parses");
    assert_eq!(s.comm, "tokio (rt) x");
    assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (150, 37, 12, 5));
    assert_eq!(s.ticks(), 204);
}

#[test]
fn stat_of_postgres_backend() {
    let line = "812 (postgres) S 700 700 700 0 -1 4194624 2101 0 0 0 33 9 0 0 20 0 1 0 \
                9000 230000000 4000 18446744073709551615 1 1 0 0 0 0 4194304 19935232 \
                1088 0 0 0 17 1 0 0 0 0 0";
    let s = parse_stat(line).expect("parses");
    assert_eq!(s.comm, "postgres");
    assert_eq!(s.ticks(), 42);
}

#[test]
fn truncated_or_garbled_stat_is_none() {
    assert_eq!(parse_stat(""), None);
    assert_eq!(parse_stat("1 (x) S 0 1 1 0 -1 0 0 0 0 0 5"), None);
    assert_eq!(parse_stat("1 x S 0 1 1 0 -1 0 0 0 0 0 5 6 7 8"), None);
    assert_eq!(parse_stat("1 (x) S 0 1 1 0 -1 0 0 0 0 0 a b c d"), None);
}

#[test]
fn vm_rss_from_status() {
    let status = "Name:\tengine\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\n\
                  VmRSS:\t   40960 kB\nRssAnon:\t 30000 kB\n";
    assert_eq!(parse_vm_rss_kib(status), Some(40960));
    // Kernel threads have no VmRSS line.
    assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\nState:\tS\n"), None);
}

#[test]
fn machine_busy_time() {
    let stat = "cpu  100 5 50 1000 40 3 2 1 7 0\ncpu0 50 2 25 500 20 1 1 0 3 0\n";
    // user + nice + system + irq + softirq + steal; guest is already inside user.
    assert_eq!(parse_cpu_busy(stat), Some(161));
    assert_eq!(parse_cpu_busy("cpu0 1 2 3 4 5\n"), None);
    assert_eq!(parse_cpu_busy("cpu 1 2 3\n"), None);
    assert_eq!(parse_cpu_busy(""), None);
}

#[test]
fn this_process_is_measured() {
    let me = Who::Pid(std::process::id());
    let procs = me.processes();
    assert_eq!(procs.len(), 1);
    assert!(me.rss_kib() > 0);
    assert!(clock_ticks_per_second() > 0);
    let meter = CostMeter::start(vec![("me".into(), me)]);
    let costs = meter.finish(10);
    assert_eq!(costs.len(), 1);
    assert!(costs[0].peak_rss_mib.is_some_and(|m| m > 0.0));
    assert!(costs[0].cpu_seconds >= 0.0);
}

#[test]
fn the_tail_is_counted_by_the_second_it_was_submitted_in() {
    let ms = Duration::from_millis;
    let samples = [
        (ms(100), ms(5)),
        (ms(900), ms(60)),
        (ms(1_500), ms(10)),
        (ms(3_200), ms(50)),
        (ms(3_300), ms(200)),
    ];
    // Seconds with no slow request are listed as 0, so a stall stands out by position.
    assert_eq!(tail_by_second(&samples, ms(50)), vec![1, 0, 0, 2]);
    assert_eq!(tail_by_second(&samples, ms(1_000)), vec![0, 0, 0, 0]);
    assert!(tail_by_second(&[], ms(1)).is_empty());
}

#[test]
fn the_start_is_left_out_only_where_asked() {
    let ms = Duration::from_millis;
    let samples = [
        (ms(0), ms(400)),
        (ms(999), ms(300)),
        (ms(1_000), ms(20)),
        (ms(2_500), ms(30)),
    ];
    assert_eq!(latencies_from(&samples, ms(1_000)), vec![ms(20), ms(30)]);
    assert_eq!(latencies_from(&samples, Duration::ZERO).len(), 4);
    assert!(latencies_from(&samples, ms(3_000)).is_empty());
}
