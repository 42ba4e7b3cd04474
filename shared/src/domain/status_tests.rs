use super::*;

#[test]
fn statuses_round_trip_through_text() {
    for s in Status::ALL {
        assert_eq!(s.as_str().parse::<Status>(), Ok(*s));
        assert_eq!(serde_json::to_value(s).expect("serializes"), s.as_str());
    }
    assert!("done".parse::<Status>().is_err());
}

#[test]
fn only_outcomes_are_final() {
    assert!(Status::Succeeded.is_final());
    assert!(Status::InDoubt.is_final());
    assert!(!Status::Running.is_final());
    assert!(!Status::Parked.is_final());
}

#[test]
fn priority_defaults_to_normal() {
    assert_eq!(Priority::default(), Priority::Normal);
    assert_eq!("high".parse::<Priority>(), Ok(Priority::High));
}

#[test]
fn the_small_vocabularies_round_trip_and_refuse_strangers() {
    for s in TxStatus::ALL {
        assert_eq!(s.as_str().parse::<TxStatus>(), Ok(*s));
    }
    for p in Permission::ALL {
        assert_eq!(p.as_str().parse::<Permission>(), Ok(*p));
    }
    assert_eq!(OnExhausted::default(), OnExhausted::Fail);
    assert_eq!(
        serde_json::from_str::<OnExhausted>("\"park\"").ok(),
        Some(OnExhausted::Park)
    );
    assert!(serde_json::from_str::<OnExhausted>("\"retry\"").is_err());
    assert!("root".parse::<Permission>().is_err());
}

/// The enums and the database's CHECK constraints must name the same values.
#[test]
fn the_enums_match_the_schema_constraints() {
    let check = |sql: &str, column: &str| -> Vec<String> {
        let at = sql
            .rfind(&format!("{column} IN"))
            .expect("the constraint is in the migration");
        let list = &sql[at..];
        let list = &list[list.find('(').expect("(") + 1..list.find(')').expect(")")];
        let mut v: Vec<String> = list
            .split(',')
            .map(|x| x.trim().trim_matches('\'').to_owned())
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let v1 = include_str!("../../../schemas/migrations/V1__initial.sql");
    let v3 = include_str!("../../../schemas/migrations/V3__two_phase.sql");
    assert_eq!(
        check(v1, "permission"),
        sorted(
            Permission::ALL
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect()
        )
    );
    assert_eq!(
        check(v3, "status"),
        sorted(
            TxStatus::ALL
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect()
        )
    );
}
