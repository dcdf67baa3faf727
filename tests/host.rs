//! The host is hostile too. Two checks of the running local stack (`scripts/stack up`), so
//! both are ignored by a plain `cargo test`; `scripts/test` runs them on the demo's stack:
//!
//! - another local user (`nobody`, through `runuser`: the test runs as root) gets nothing of
//!   it: it cannot list the stack's directory or open a file in it (keys, passwords, logs,
//!   the brokers' and the databases' data), cannot connect to Postgres over its socket or as
//!   any role without the role's password over TCP, cannot use the broker without a
//!   principal's password, and finds no password on any process's command line (which every
//!   local user may read) nor in any process's environment (which it may not);
//! - every role holds exactly the rights declared in `deploy/postgres/rights.txt` (the
//!   table privileges, column by column where a grant names columns, functions, databases,
//!   role attributes and `pg_hba`), read from Postgres's catalog: a grant added without
//!   declaring it fails here. docs/security.md shows the same file.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use orderflow_tests::stack;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

/// The variable naming the probe's plan: a file of what another user is pointed at (paths,
/// ports and role names, nothing secret), readable by anyone.
const PROBE: &str = "ORDERFLOW_STRANGER_PROBE";

fn stack_dir() -> PathBuf {
    PathBuf::from(
        stack()
            .vars
            .get("ORDERFLOW_STACK_DIR")
            .cloned()
            .unwrap_or_else(|| format!("{}/../.stack", env!("CARGO_MANIFEST_DIR"))),
    )
}

/// Every file under `dir` (as this process, root, sees them).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Every secret the stack made (`.stack/secrets`: NAME=value lines).
fn secrets(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("secrets"))
        .expect("the stack's secrets")
        .lines()
        .filter_map(|line| line.split_once('=').map(|(_, value)| value.to_owned()))
        .filter(|value| value.len() >= 12)
        .collect()
}

/// What the stranger managed, one finding per line (`denied ...` lines are what it tried and
/// was refused; anything else is a leak).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Findings {
    /// The stack's directory listed.
    listed: Vec<String>,
    /// Files opened for reading.
    read: Vec<String>,
    /// Postgres connections made, as `how role`.
    connected: Vec<String>,
    /// Why each Postgres attempt failed (to tell "refused" from "unreachable").
    postgres_refusals: Vec<String>,
    /// Broker connections that answered metadata.
    brokers: Vec<String>,
    /// Why each broker attempt failed.
    broker_refusals: Vec<String>,
    /// Whether the broker's port took a TCP connection (so a refusal is the broker's, not an
    /// unreachable port's).
    broker_port_open: bool,
    /// Every process's command line.
    command_lines: Vec<String>,
    /// Processes whose environment was readable.
    environments: Vec<String>,
}

#[test]
#[ignore = "runs on the stack, as root: scripts/test"]
fn another_local_user_gets_nothing_of_the_stack() {
    let is_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    assert!(
        is_root,
        "this test acts as another local user through runuser: run it as root"
    );
    let dir = stack_dir();
    let files = files_under(&dir);
    assert!(files.len() > 20, "the stack has its files: {}", files.len());
    let postgres_socket_dir = dir.join("pg/run");
    let port = stack()
        .admin_url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let roles: Vec<String> = stack()
        .vars
        .keys()
        .filter_map(|key| key.strip_prefix("ORDERFLOW_DB_AS_"))
        .map(str::to_lowercase)
        .chain(
            [
                "postgres",
                "orders_owner",
                "payments_owner",
                "fulfilment_owner",
                "gateway_owner",
            ]
            .map(str::to_owned),
        )
        .collect();
    let plan = serde_json::json!({
        "stack_dir": dir,
        "files": files,
        "socket_dir": postgres_socket_dir,
        "port": port,
        "roles": roles,
        "bootstrap": stack().bootstrap_servers,
    });
    // The probe is this very test binary, run as `nobody`: it needs no file of the stack.
    let plan_file = std::env::temp_dir().join(format!("orderflow-stranger-plan-{}.json", uuid::Uuid::now_v7()));
    std::fs::write(&plan_file, plan.to_string()).unwrap();
    std::fs::set_permissions(&plan_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let binary = std::env::current_exe().unwrap();
    let output = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&binary)
        .args([
            "--exact",
            "stranger_probe",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        // Nothing of this process's environment (the stack's passwords are in it): the
        // stranger knows only where to look.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(PROBE, &plan_file)
        .output()
        .expect("runuser");
    std::fs::remove_file(&plan_file).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the probe ran as nobody: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let findings: Findings = stdout
        .lines()
        .find_map(|line| line.split_once("FINDINGS ").map(|(_, json)| json))
        .map(|json| serde_json::from_str(json).unwrap())
        .unwrap_or_else(|| panic!("the probe reported: {stdout}"));
    println!(
        "as nobody: {} files tried, {} Postgres connections and {} broker connections refused, {} command lines read",
        files.len(),
        findings.postgres_refusals.len(),
        findings.broker_refusals.len(),
        findings.command_lines.len()
    );
    assert!(findings.listed.is_empty(), "listed: {:?}", findings.listed);
    assert!(findings.read.is_empty(), "another user read: {:?}", findings.read);
    assert!(
        findings.connected.is_empty(),
        "another user connected to Postgres: {:?}",
        findings.connected
    );
    assert!(
        findings.brokers.is_empty(),
        "another user used the broker: {:?}",
        findings.brokers
    );
    assert!(
        findings.broker_port_open && findings.broker_refusals.len() == 2,
        "the broker was reached and refused both attempts: {:?}",
        findings.broker_refusals
    );
    assert!(
        findings.environments.is_empty(),
        "environments read: {:?}",
        findings.environments
    );
    // Refused for the right reason: the socket's directory is closed, TCP asks a password (a
    // probe that could not reach Postgres at all would prove nothing).
    assert!(
        findings
            .postgres_refusals
            .iter()
            .any(|r| r.starts_with("socket") && r.contains("ermission denied")),
        "{:?}",
        findings.postgres_refusals
    );
    assert!(
        findings
            .postgres_refusals
            .iter()
            .filter(|r| r.starts_with("tcp"))
            .all(|r| r.contains("password")),
        "{:?}",
        findings.postgres_refusals
    );
    let secrets = secrets(&dir);
    for line in &findings.command_lines {
        for secret in &secrets {
            assert!(!line.contains(secret.as_str()), "a password on a command line: {line}");
        }
    }
    // No log holds one either (as root: a log is shipped and read where the secret must not be).
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "log")) {
        let text = String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned();
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a password in {}", file.display());
        }
    }
}

/// The other half of [`another_local_user_gets_nothing_of_the_stack`], run by it as `nobody`
/// with what to try in `ORDERFLOW_STRANGER_PROBE`; alone (without that variable) it has
/// nothing to try and says so.
#[tokio::test(flavor = "current_thread")]
#[ignore = "run by another_local_user_gets_nothing_of_the_stack as nobody"]
async fn stranger_probe() {
    let Ok(plan) = std::env::var(PROBE) else {
        println!("stranger_probe: run by another_local_user_gets_nothing_of_the_stack; nothing to try alone");
        return;
    };
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(plan).unwrap()).unwrap();
    let text = |key: &str| plan[key].as_str().unwrap().to_owned();
    let mut findings = Findings::default();

    if let Ok(entries) = std::fs::read_dir(text("stack_dir")) {
        findings.listed = entries.flatten().map(|e| e.path().display().to_string()).collect();
    }
    for file in plan["files"].as_array().unwrap() {
        let file = file.as_str().unwrap();
        if std::fs::File::open(file).is_ok() {
            findings.read.push(file.to_owned());
        }
    }

    let port: u16 = text("port").parse().unwrap();
    for role in plan["roles"].as_array().unwrap() {
        let role = role.as_str().unwrap();
        let database = if role == "postgres" { "postgres" } else { "orders" };
        let attempts = [
            (
                "socket",
                sqlx::postgres::PgConnectOptions::new()
                    .socket(text("socket_dir"))
                    .port(port)
                    .username(role)
                    .database(database),
            ),
            (
                "tcp without a password",
                sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(port)
                    .username(role)
                    .database(database),
            ),
            (
                "tcp with a guessed password",
                sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(port)
                    .username(role)
                    .password(role)
                    .database(database),
            ),
        ];
        for (how, options) in attempts {
            use sqlx::ConnectOptions as _;
            match tokio::time::timeout(Duration::from_secs(10), options.connect()).await {
                Ok(Ok(_)) => findings.connected.push(format!("{how} {role}")),
                Ok(Err(error)) => findings.postgres_refusals.push(format!("{how} {role}: {error}")),
                Err(_) => findings
                    .postgres_refusals
                    .push(format!("{how} {role}: no answer in 10 s")),
            }
        }
    }

    let bootstrap = text("bootstrap");
    findings.broker_port_open = bootstrap
        .split(',')
        .next()
        .is_some_and(|address| std::net::TcpStream::connect(address).is_ok());
    for (how, settings) in [
        ("no credentials", vec![("security.protocol", "plaintext")]),
        (
            "a guessed password",
            vec![
                ("security.protocol", "sasl_plaintext"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "admin"),
                ("sasl.password", "admin"),
            ],
        ),
    ] {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &bootstrap).set("group.id", "stranger");
        for (key, value) in settings {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config.create().unwrap();
        match consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(metadata) if !metadata.topics().is_empty() => findings
                .brokers
                .push(format!("{how}: {} topics", metadata.topics().len())),
            Ok(_) => findings.broker_refusals.push(format!("{how}: no topic visible")),
            Err(error) => findings.broker_refusals.push(format!("{how}: {error}")),
        }
    }

    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            findings
                .command_lines
                .push(String::from_utf8_lossy(&bytes).replace('\0', " "));
        }
        // Its own processes' environment it may read: only others' count.
        let own = entry.metadata().map(|m| m.uid()).ok() == std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if !own && std::fs::read(entry.path().join("environ")).is_ok() {
            findings.environments.push(name);
        }
    }
    println!("FINDINGS {}", serde_json::to_string(&findings).unwrap());
}

/// The rights matrix as Postgres's catalog has it now, in `deploy/postgres/rights.txt`'s
/// format: one line per role and object with what it may do there.
async fn rights_in_catalog() -> BTreeSet<String> {
    let admin = |database: &str| {
        let (base, _) = stack().admin_url.rsplit_once('/').unwrap();
        format!("{base}/{database}")
    };
    let mut lines = BTreeSet::new();
    let cluster = sqlx::PgPool::connect(&admin("postgres")).await.unwrap();
    // Every role that may log in, with the attributes that reach past its grants.
    let roles: Vec<(String, bool, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls
         FROM pg_roles WHERE rolcanlogin ORDER BY 1",
    )
    .fetch_all(&cluster)
    .await
    .unwrap();
    for (role, superuser, createdb, createrole, replication, bypassrls) in &roles {
        let attributes: Vec<&str> = [
            (*superuser, "SUPERUSER"),
            (*createdb, "CREATEDB"),
            (*createrole, "CREATEROLE"),
            (*replication, "REPLICATION"),
            (*bypassrls, "BYPASSRLS"),
        ]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect();
        lines.insert(
            format!("cluster {role} login {}", attributes.join(" "))
                .trim_end()
                .to_owned(),
        );
    }
    /// A `pg_hba` line: type, databases, users, address, method.
    type HbaLine = (String, Vec<String>, Vec<String>, Option<String>, Option<String>);
    let hba: Vec<HbaLine> = sqlx::query_as(
        "SELECT type, database, user_name, address, auth_method FROM pg_hba_file_rules ORDER BY line_number",
    )
    .fetch_all(&cluster)
    .await
    .unwrap();
    for (kind, databases, users, address, method) in hba {
        lines.insert(format!(
            "hba {kind} {} {} {} {}",
            databases.join(","),
            users.join(","),
            address.unwrap_or_else(|| "-".to_owned()),
            method.unwrap_or_default()
        ));
    }
    // Memberships: a member uses its role's rights (or SET ROLE to it), the predefined roles'
    // (pg_read_server_files, pg_execute_server_program, ...) included.
    let members: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT m.rolname::text, r.rolname::text, a.admin_option
         FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member JOIN pg_roles r ON r.oid = a.roleid
         WHERE m.rolcanlogin",
    )
    .fetch_all(&cluster)
    .await
    .unwrap();
    for (member, role, admin) in members {
        lines.insert(format!(
            "member {member} of {role}{}",
            if admin { " WITH ADMIN" } else { "" }
        ));
    }
    cluster.close().await;

    let login_roles: Vec<&str> = roles
        .iter()
        .filter(|(_, superuser, ..)| !superuser)
        .map(|(role, ..)| role.as_str())
        .collect();
    // Every database a role could connect to: the services' and the cluster's own.
    for database in ["postgres", "template1", "orders", "payments", "fulfilment", "gateway"] {
        let pool = sqlx::PgPool::connect(&admin(database)).await.unwrap();
        let owner: String =
            sqlx::query_scalar("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1")
                .bind(database)
                .fetch_one(&pool)
                .await
                .unwrap();
        lines.insert(format!("{database} {owner} owner"));
        for role in login_roles.iter().filter(|role| **role != owner) {
            // A role that cannot connect here holds nothing here (whatever PUBLIC may do).
            let connects: bool = sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CONNECT')")
                .bind(role)
                .fetch_one(&pool)
                .await
                .unwrap();
            if !connects {
                continue;
            }
            let held: Vec<String> = sqlx::query_scalar(RIGHTS_OF_ROLE)
                .bind(role)
                .fetch_all(&pool)
                .await
                .unwrap();
            lines.extend(held.into_iter().map(|line| format!("{database} {role} {line}")));
        }
        pool.close().await;
    }
    lines
}

/// What one role may do in the current database, one line per object: the database itself,
/// its schema, each table and sequence (privileges held on the whole table, then those held
/// on some columns only, with the columns), each function of the schema that is not an
/// extension's.
const RIGHTS_OF_ROLE: &str = "
WITH r AS (SELECT $1::text AS role),
database AS (
    SELECT 'database ' || string_agg(p, ' ' ORDER BY p) AS line FROM r,
    unnest(ARRAY['CONNECT', 'CREATE', 'TEMPORARY']) AS p
    WHERE has_database_privilege(r.role, current_database(), p)),
schema AS (
    SELECT 'schema ' || string_agg(p, ' ' ORDER BY p) AS line FROM r, unnest(ARRAY['CREATE', 'USAGE']) AS p
    WHERE has_schema_privilege(r.role, 'public', p)),
tables AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')),
whole AS (
    SELECT t.relname, string_agg(p, ' ' ORDER BY p) AS privileges FROM r, tables t,
    unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p
    WHERE t.relkind <> 'S' AND has_table_privilege(r.role, t.oid, p)
    GROUP BY t.relname),
columns AS (
    SELECT t.relname, p || '(' || string_agg(a.attname::text, ',' ORDER BY a.attname) || ')' AS privilege
    FROM r, tables t JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped,
    unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p
    WHERE t.relkind <> 'S' AND NOT has_table_privilege(r.role, t.oid, p)
      AND has_column_privilege(r.role, t.oid, a.attnum, p)
    GROUP BY t.relname, p),
per_table AS (
    SELECT relname, string_agg(privileges, ' ' ORDER BY privileges) AS privileges FROM (
        SELECT relname, privileges FROM whole UNION ALL SELECT relname, privilege FROM columns) x
    GROUP BY relname),
sequences AS (
    SELECT 'sequence ' || t.relname || ' ' || string_agg(p, ' ' ORDER BY p) AS line FROM r, tables t,
    unnest(ARRAY['SELECT', 'UPDATE', 'USAGE']) AS p
    WHERE t.relkind = 'S' AND has_sequence_privilege(r.role, t.oid, p)
    GROUP BY t.relname),
functions AS (
    SELECT 'function ' || f.oid::regprocedure::text || ' EXECUTE' AS line FROM r, pg_proc f
    WHERE f.pronamespace = 'public'::regnamespace
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = f.oid AND d.deptype = 'e')
      AND has_function_privilege(r.role, f.oid, 'EXECUTE'))
SELECT line FROM database WHERE line IS NOT NULL
UNION ALL SELECT line FROM schema WHERE line IS NOT NULL
UNION ALL SELECT 'table ' || relname || ' ' || privileges FROM per_table
UNION ALL SELECT line FROM sequences
UNION ALL SELECT line FROM functions";

/// `deploy/postgres/rights.txt` as it applies to a stack in `outbox_mode` (a line that ends
/// in `[wal-message]` or `[table]` holds in that mode only).
fn declared_rights(outbox_mode: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(rights_file()).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| match line.rsplit_once(" [") {
            Some((rest, mode)) => (mode.trim_end_matches(']') == outbox_mode).then(|| rest.trim_end().to_owned()),
            None => Some(line.to_owned()),
        })
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn rights_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres/rights.txt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reads the running stack's catalog: scripts/test"]
async fn every_role_holds_exactly_the_declared_rights() {
    let mode = std::fs::read_to_string(stack_dir().join("outbox-mode"))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|_| "table".to_owned());
    let actual = rights_in_catalog().await;
    let declared = declared_rights(&mode);
    let undeclared: Vec<&String> = actual.difference(&declared).collect();
    let missing: Vec<&String> = declared.difference(&actual).collect();
    assert!(
        undeclared.is_empty() && missing.is_empty(),
        "the catalog ({mode} mode) and {} differ.\nheld but not declared:\n  {}\ndeclared but not held:\n  {}",
        rights_file().display(),
        undeclared.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    );
    // The same matrix is what docs/security.md shows, line for line.
    let docs = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md")).unwrap();
    let text = std::fs::read_to_string(rights_file()).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        assert!(
            docs.contains(line),
            "docs/security.md does not show the matrix line: {line}"
        );
    }
}

/// What a stolen relay or broker credential can do on the running stack (here the admin
/// principal, which may write any topic): write an `OrderPlaced` signed by a key of its own
/// into `orders.events`. Every consumer process refuses it and counts it in
/// `orderflow_events_rejected_total` (what the EventSignatureRejected alert reads); the gateway
/// never hears of the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes to the running stack's topic: scripts/test"]
async fn a_forged_event_on_the_stack_is_refused_and_counted_by_every_consumer() {
    use orderflow::envelope::{EventMeta, seal};
    use orderflow::events::v1::OrderPlaced;
    use orderflow::events::v1::event_envelope::Payload;
    use orderflow_platform::signing::{EventSigner, ORDER_SVC};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let rejected = |port: u16| {
        tokio::task::spawn_blocking(move || {
            ordersctl::bench::probe::scrape_sum(
                &format!("127.0.0.1:{port}"),
                orderflow_platform::telemetry::EVENTS_REJECTED,
                "reason=\"unknown_key\"",
            )
            .unwrap_or(0.0)
        })
    };
    let consumers = [("payment-svc", 9102), ("fulfilment", 9103), ("order-projector", 9104)];
    let mut before = Vec::new();
    for (_, port) in consumers {
        before.push(rejected(port).await.unwrap());
    }
    let order = uuid::Uuid::now_v7();
    let valid = orderflow_tests::valid_order(77);
    let envelope = seal(
        EventMeta {
            message_id: uuid::Uuid::now_v7(),
            aggregate_id: order,
            correlation_id: order,
            causation_id: None,
            traceparent: None,
            occurred_at: orderflow_platform::outbox::now_timestamp(),
        },
        Payload::OrderPlaced(OrderPlaced {
            order_id: order.to_string(),
            customer_id: valid.customer_id,
            items: valid.items,
            total: valid.total,
            payment_token: valid.payment_token,
        }),
    );
    let forged = EventSigner::ephemeral(ORDER_SVC).unwrap().seal(&envelope);
    let producer: FutureProducer =
        orderflow_platform::kafka::producer_config(&stack().kafka, "forger", Duration::from_secs(10))
            .create()
            .unwrap();
    producer
        .send(
            FutureRecord::to(orderflow::topics::ORDERS_EVENTS)
                .key(&order.to_string())
                .payload(&forged),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(error, _)| error)
        .unwrap();
    for ((name, port), before) in consumers.into_iter().zip(before) {
        let counted = orderflow_tests::eventually(Duration::from_secs(60), || async move {
            rejected(port).await.unwrap() > before
        })
        .await;
        let lag = tokio::task::spawn_blocking(move || {
            ordersctl::bench::probe::scrape_sum(
                &format!("127.0.0.1:{port}"),
                orderflow_platform::telemetry::CONSUMER_LAG,
                "",
            )
        })
        .await
        .unwrap();
        assert!(
            counted,
            "{name} counted the forged event in orderflow_events_rejected_total (its consumer lag: {lag:?})"
        );
    }
    let gateway = sqlx::PgPool::connect(&stack().vars["ORDERFLOW_GATEWAY_DATABASE_URL"])
        .await
        .unwrap();
    let lines: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE order_id = $1")
        .bind(order.to_string())
        .fetch_one(&gateway)
        .await
        .unwrap();
    assert_eq!(lines, 0, "no money moved for the forged order");
}
