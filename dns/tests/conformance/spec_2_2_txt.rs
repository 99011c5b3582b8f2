//! §2.2 Record for schema version: `dns-version.<zone>. <ttl> IN TXT <schema-version>`.

use hickory_proto::rr::RecordType;

use crate::support::*;

#[test]
fn schema_version_txt() {
    let index = index_of(cluster());
    assert_records(
        ask(&index, "dns-version.cluster.local.", RecordType::TXT),
        vec!["dns-version.cluster.local. 5 IN TXT 1.0.1"],
    );
    assert_eq!(fairlead_dns::SCHEMA_VERSION, "1.0.1");
}

#[test]
fn other_types_at_dns_version_are_nodata() {
    let index = index_of(cluster());
    assert_nodata(
        ask(&index, "dns-version.cluster.local.", RecordType::A),
        SOA,
    );
}

#[test]
fn zone_apex_has_the_soa() {
    let index = index_of(cluster());
    let a = ask(&index, "cluster.local.", RecordType::SOA);
    assert_records(a, vec![SOA]);
}
