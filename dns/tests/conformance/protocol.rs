//! Wire-level behaviour: malformed and truncated queries, multiple questions, unknown types,
//! odd case, EDNS0 echo, truncation.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use crate::support::*;
use fairlead_dns::answer_from_index;

#[test]
fn odd_case_matches_and_the_question_is_echoed_as_sent() {
    let index = index_of(cluster());
    let q = query_bytes("WeB.sHoP.SVC.Cluster.Local.", RecordType::A, None);
    let bytes = answer_from_index(&index, &q, 1232).unwrap();
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(
        m.queries[0].name().to_string(),
        "WeB.sHoP.SVC.Cluster.Local."
    );
    // The owner is a pointer to the question, so it keeps the client's case.
    assert_eq!(
        m.answers[0].to_string(),
        "WeB.sHoP.SVC.Cluster.Local. 5 IN A 10.96.0.20"
    );
    // Without a trailing dot the name on the wire is the same.
    assert_eq!(
        ask(&index, "web.shop.svc.cluster.local", RecordType::A)
            .answers
            .len(),
        1
    );
}

#[test]
fn unknown_types_in_the_zone_are_nodata() {
    let index = index_of(cluster());
    assert_nodata(
        ask(&index, "web.shop.svc.cluster.local", RecordType::MX),
        SOA,
    );
    assert_nodata(
        ask(
            &index,
            "web.shop.svc.cluster.local",
            RecordType::Unknown(65280),
        ),
        SOA,
    );
}

#[test]
fn malformed_and_truncated_queries() {
    let index = index_of(cluster());
    let good = query_bytes("web.shop.svc.cluster.local.", RecordType::A, Some(1232));
    // Shorter than a header: dropped.
    assert_eq!(answer_from_index(&index, &good[..11], 1232), None);
    // Cut anywhere inside the question or the OPT record: FORMERR with the id.
    for cut in 12..good.len() {
        let bytes = answer_from_index(&index, &good[..cut], 1232).expect("answered");
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::FormErr,
            "cut at {cut}"
        );
        assert_eq!(m.metadata.id, 0xbeef);
    }
    // A response is never answered.
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(answer_from_index(&index, &response, 1232), None);
}

#[test]
fn multiple_questions_are_formerr() {
    let index = index_of(cluster());
    let mut m = Message::from_vec(&query_bytes(
        "web.shop.svc.cluster.local.",
        RecordType::A,
        None,
    ))
    .unwrap();
    let q = m.queries[0].clone();
    m.add_query(q);
    let bytes = answer_from_index(&index, &m.to_vec().unwrap(), 1232).unwrap();
    assert_eq!(decode(&bytes).rcode, ResponseCode::FormErr);
}

#[test]
fn edns_is_echoed_and_absent_without_it() {
    let index = index_of(cluster());
    let with = answer_from_index(
        &index,
        &query_bytes("web.shop.svc.cluster.local.", RecordType::A, Some(4096)),
        1232,
    )
    .unwrap();
    let m = Message::from_vec(&with).unwrap();
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    let without = answer_from_index(
        &index,
        &query_bytes("web.shop.svc.cluster.local.", RecordType::A, None),
        1232,
    )
    .unwrap();
    assert!(Message::from_vec(&without).unwrap().edns.is_none());
}

#[test]
fn answers_over_the_udp_limit_are_truncated() {
    // 60 ready endpoints: 60 A records of 16 bytes plus the question exceed 512 bytes.
    let ips: Vec<String> = (1..=60).map(|i| format!("10.244.3.{i}")).collect();
    let snap = fairlead_core::Snapshot::builder()
        .service(headless("shop", "big", &[]))
        .endpoint_slice(slice(serde_json::json!({
            "metadata": {"name": "big", "namespace": "shop", "labels": {"kubernetes.io/service-name": "big"}},
            "addressType": "IPv4",
            "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip]})).collect::<Vec<_>>()
        })))
        .build();
    let index = index_of(snap);
    let classic = decode(
        &answer_from_index(
            &index,
            &query_bytes("big.shop.svc.cluster.local.", RecordType::A, None),
            1232,
        )
        .unwrap(),
    );
    assert!(classic.tc && classic.answers.is_empty(), "{classic:#?}");
    let edns = decode(
        &answer_from_index(
            &index,
            &query_bytes("big.shop.svc.cluster.local.", RecordType::A, Some(1232)),
            1232,
        )
        .unwrap(),
    );
    assert!(!edns.tc);
    assert_eq!(edns.answers.len(), 60);
}

#[test]
fn names_outside_the_zone_are_not_answered_from_the_index() {
    let index = index_of(cluster());
    let a = ask(&index, "example.com.", RecordType::A);
    assert_eq!(a.rcode, ResponseCode::Refused);
    // Reverse names outside the configured ranges are not ours either (they are forwarded).
    assert_eq!(
        ask(&index, "1.2.0.192.in-addr.arpa.", RecordType::PTR).rcode,
        ResponseCode::Refused
    );
}
