use serde_json::json;

use super::*;
use crate::drive::database_name;
use crate::provisio::request_input;

fn args(argv: &[&str]) -> Args {
    Args::parse_from(std::iter::once("provisio-bench").chain(argv.iter().copied()))
}

#[test]
fn closed_loop_is_the_default() {
    let Plan::Closed {
        concurrency,
        requests,
        deadline,
    } = Plan::from_args(&args(&[])).expect("plan")
    else {
        panic!("not closed loop");
    };
    assert_eq!((concurrency, requests, deadline), (64, 5000, None));
    let Plan::Closed {
        requests, deadline, ..
    } = Plan::from_args(&args(&["--duration", "10"])).expect("plan")
    else {
        panic!("not closed loop");
    };
    assert_eq!(
        (requests, deadline),
        (usize::MAX, Some(Duration::from_secs(10)))
    );
}

#[test]
fn open_loop_requests_from_rate_and_duration() {
    let plan = |a: &[&str]| match Plan::from_args(&args(a)) {
        Ok(Plan::Open { rate, requests }) => Ok((rate, requests)),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(
        plan(&["--rate", "200", "--duration", "15"]),
        Ok((200.0, 3000))
    );
    assert_eq!(
        plan(&["--rate", "200", "--requests", "10"]),
        Ok((200.0, 10))
    );
    assert_eq!(plan(&["--rate", "2.5"]), Ok((2.5, 75)));
    assert!(plan(&["--rate", "200", "--duration", "1", "--requests", "5"]).is_err());
    assert!(plan(&["--rate", "0"]).is_err());
    assert!(plan(&["--rate", "10", "--duration=-1"]).is_err());
}

#[test]
fn database_name_is_the_last_path_segment() {
    assert_eq!(
        database_name("postgres://postgres@127.0.0.1:5432/pv_0123456789ab"),
        "pv_0123456789ab"
    );
}

#[test]
fn default_input_names_the_request() {
    assert_eq!(request_input(None, 7), json!({"name": "User7"}));
    let t = json!({"x": 1});
    assert_eq!(request_input(Some(&t), 7), t);
}

#[test]
fn one_pair_is_the_default_and_pairs_are_bounded() {
    assert_eq!(args(&[]).pairs, 1);
    assert_eq!(args(&["--pairs", "5"]).pairs, 5);
    let parse = |a: &[&str]| {
        Args::try_parse_from(std::iter::once("provisio-bench").chain(a.iter().copied()))
    };
    assert!(parse(&["--pairs", "0"]).is_err());
    assert!(parse(&["--pairs", "51"]).is_err());
}
