//! The auth-query endpoint answers what PgBouncer asks, from tokio-postgres and from a raw
//! client sending PgBouncer's exact messages: the auth query, extended and simple. A stub lookup
//! stands in for the token source: these tests are about the protocol, not about tokens.

mod support;

use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use support::auth_endpoint::{
    AUTH_SECRET, AUTH_USER, Endpoint, PGBOUNCER_QUERY, RawClient, quick_limits,
};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn auth_user_runs_the_auth_query() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    let statement = client.prepare(PGBOUNCER_QUERY).await.unwrap();
    let rows = client.query(&statement, &[&"alice"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "alice");
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");
    assert!(
        client
            .query(&statement, &[&"mallory"])
            .await
            .unwrap()
            .is_empty()
    );
    // A customised auth_query works as long as $1 is its only parameter.
    let custom = "SELECT u, p FROM my_users($1)";
    let rows = client.query(custom, &[&"alice"]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(1), "alice-token");
    // Lookup failures are errors the session survives.
    let err = client.query(&statement, &[&"bob"]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYSTEM_ERROR), "{err}");
    assert!(!format!("{err:?}").contains("alice-token"), "{err:?}");
    let err = client.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let err = client
        .query("SELECT $1, $2", &[&"a", &"b"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(
        client.query(&statement, &[&"alice"]).await.unwrap().len(),
        1
    );
    ep.stop().await;
}

#[tokio::test]
async fn the_target_is_the_database_connected_to() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let (client, connection) = ep
        .config(AUTH_USER, Some(AUTH_SECRET), "otherdb")
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let err = client
        .query(PGBOUNCER_QUERY, &[&"alice"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{err}");
    ep.stop().await;
}

#[tokio::test]
async fn simple_queries() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let client = ep.login().await;
    let rows = client.simple_query("SELECT 1").await.unwrap();
    let values: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1"]);
    client.simple_query("").await.unwrap();
    client.batch_execute("select 1;").await.unwrap();
    // What PgBouncer sends on its own: variable sync and its server_reset_query.
    client
        .batch_execute("SET DateStyle='ISO, DMY';SET application_name='it''s me';")
        .await
        .unwrap();
    client.batch_execute("DISCARD ALL").await.unwrap();
    let err = client.simple_query("SELECT now()").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let err = client
        .batch_execute("SELECT 1; DROP TABLE x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    assert_eq!(client.simple_query("SELECT 1").await.unwrap().len(), 3);
    ep.stop().await;
}

#[tokio::test]
async fn pgbouncer_shaped_auth_query() {
    let ep = Endpoint::start(quick_limits(), None).await;
    let mut raw = RawClient::connect(ep.addr).await;
    raw.login().await;
    for (user, rows) in [("alice", 1), ("mallory", 0)] {
        // PgBouncer's pktbuf_write_ExtQuery: Parse, Bind (no format codes, one text value),
        // Describe portal, Execute, Sync, all in one write.
        frontend::parse("", PGBOUNCER_QUERY, [], &mut raw.out).unwrap();
        frontend::bind(
            "",
            "",
            [],
            [user],
            |v, buf| {
                buf.extend_from_slice(v.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [],
            &mut raw.out,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::describe(b'P', "", &mut raw.out).unwrap();
        frontend::execute("", 0, &mut raw.out).unwrap();
        frontend::sync(&mut raw.out);
        raw.send().await;
        assert!(matches!(raw.next().await, Message::ParseComplete));
        assert!(matches!(raw.next().await, Message::BindComplete));
        let Message::RowDescription(desc) = raw.next().await else {
            panic!("RowDescription expected")
        };
        use fallible_iterator::FallibleIterator;
        assert_eq!(desc.fields().count().unwrap(), 2);
        if rows == 1 {
            let Message::DataRow(row) = raw.next().await else {
                panic!("DataRow expected")
            };
            let buf = row.buffer();
            let values: Vec<_> = row
                .ranges()
                .map(|r| Ok(std::str::from_utf8(&buf[r.unwrap()]).unwrap().to_owned()))
                .collect()
                .unwrap();
            assert_eq!(values, ["alice", "alice-token"]);
        }
        let Message::CommandComplete(done) = raw.next().await else {
            panic!("CommandComplete expected")
        };
        assert_eq!(done.tag().unwrap(), format!("SELECT {rows}"));
        assert!(matches!(raw.next().await, Message::ReadyForQuery(_)));
    }
    // After an error, the rest of the batch is skipped up to Sync.
    frontend::execute("no-such-portal", 0, &mut raw.out).unwrap();
    frontend::describe(b'S', "", &mut raw.out).unwrap();
    frontend::sync(&mut raw.out);
    raw.send().await;
    assert_eq!(raw.error_code().await, "34000");
    assert!(matches!(raw.next().await, Message::ReadyForQuery(_)));
    frontend::terminate(&mut raw.out);
    raw.send().await;
    raw.expect_eof().await;
    ep.stop().await;
}
