use super::*;

#[test]
fn gids_round_trip() {
    let id = Uuid::now_v7();
    assert_eq!(
        parse_gid(&gid(id, "billing_eu")),
        Some((id, "billing_eu".to_owned()))
    );
    assert_eq!(parse_gid("other_1"), None);
}
