//! Targets: which tenant databases a wave covers (PRODUCT.md §3). A CSV file
//! (`tenant_id,dsn[,labels…]`), a catalog query on the catalog database, or discovery of
//! every database on a server whose name matches a `LIKE` pattern. A catalog query is
//! a read: one statement (extended protocol), in a `READ ONLY` transaction that is
//! rolled back, under a statement timeout, fetching one row past the tenant limit. Every source is validated as a whole: duplicate ids, bad DSNs, missing columns
//! and an empty set are reported with the first offending rows and their line numbers.
//! This module resolves targets; it never applies anything.

use std::collections::{BTreeMap, HashSet};

use std::time::Duration;

use crate::connect::{Session, SessionSettings};
use crate::dsn::Dsn;
use crate::reach::Reach;

/// One tenant database.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Stable id, unique in a wave.
    pub id: String,
    /// How to reach it.
    pub dsn: Dsn,
    /// Labels, for canary selection and reporting.
    pub labels: BTreeMap<String, String>,
}

/// Where a wave's tenants come from.
#[derive(Debug, Clone)]
pub enum TargetSource {
    /// CSV text with a header `tenant_id,dsn[,label…]`; `origin` names it in errors.
    Csv { text: String, origin: String },
    /// A query on a catalog database returning `tenant_id, dsn[, labels…]`.
    Catalog { dsn: String, query: String },
    /// Every database on the server of `dsn` whose name is `LIKE pattern`.
    Discover { dsn: String, pattern: String },
}

/// How many offending rows an error lists.
const MAX_LISTED: usize = 10;

/// Why targets could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{origin}: {message}")]
    Source { origin: String, message: String },
    #[error("{origin}: {} bad row{}:{}", .rows.len(), if .rows.len() == 1 { "" } else { "s" }, list(.rows))]
    Rows { origin: String, rows: Vec<String> },
    #[error("{origin}: no tenants")]
    Empty { origin: String },
}

fn list(rows: &[String]) -> String {
    rows.iter().map(|r| format!("\n  {r}")).collect()
}

/// Resolves `source` into at most `max_tenants` tenants, in the order the source gives
/// them. Catalog and discovery connections go only where `reach` allows.
pub async fn resolve(
    source: &TargetSource,
    reach: &Reach,
    max_tenants: usize,
) -> Result<Vec<Tenant>, TargetError> {
    let tenants = match source {
        TargetSource::Csv { text, origin } => parse_csv(text, origin)?,
        TargetSource::Catalog { dsn, query } => catalog(dsn, query, reach, max_tenants).await?,
        TargetSource::Discover { dsn, pattern } => {
            discover(dsn, pattern, reach, max_tenants).await?
        }
    };
    Ok(tenants)
}

/// Checks rows `(line, id, dsn text, labels)` and builds tenants.
fn build(
    origin: &str,
    rows: Vec<(u64, String, String, BTreeMap<String, String>)>,
) -> Result<Vec<Tenant>, TargetError> {
    let mut bad = Vec::new();
    let mut seen = HashSet::new();
    let mut tenants = Vec::with_capacity(rows.len());
    for (line, id, dsn, labels) in rows {
        let id = id.trim().to_string();
        if id.is_empty() {
            bad.push(format!("line {line}: empty tenant_id"));
            continue;
        }
        if !seen.insert(id.clone()) {
            bad.push(format!("line {line}: duplicate tenant_id {id:?}"));
            continue;
        }
        match Dsn::parse(&dsn) {
            Ok(dsn) => tenants.push(Tenant { id, dsn, labels }),
            Err(e) => bad.push(format!("line {line}: tenant {id:?}: {e}")),
        }
    }
    if !bad.is_empty() {
        let more = bad.len().saturating_sub(MAX_LISTED);
        bad.truncate(MAX_LISTED);
        if more > 0 {
            bad.push(format!("… and {more} more"));
        }
        return Err(TargetError::Rows {
            origin: origin.to_string(),
            rows: bad,
        });
    }
    if tenants.is_empty() {
        return Err(TargetError::Empty {
            origin: origin.to_string(),
        });
    }
    Ok(tenants)
}

/// Builds tenants from `(tenant_id, dsn, labels)` entries already split into fields: the
/// list a client uploads. Validated like every other source.
pub fn from_entries(
    entries: Vec<(String, String, BTreeMap<String, String>)>,
    origin: &str,
) -> Result<Vec<Tenant>, TargetError> {
    let rows = entries
        .into_iter()
        .enumerate()
        .map(|(i, (id, dsn, labels))| (i as u64 + 1, id, dsn, labels))
        .collect();
    build(&format!("{origin} (line numbers count entries)"), rows)
}

/// Parses CSV targets.
pub fn parse_csv(text: &str, origin: &str) -> Result<Vec<Tenant>, TargetError> {
    let source_error = |message: String| TargetError::Source {
        origin: origin.to_string(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| source_error(format!("cannot read the header: {e}")))?
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if header.len() < 2 || header[0] != "tenant_id" || header[1] != "dsn" {
        return Err(source_error(format!(
            "the header must start with tenant_id,dsn (found {:?})",
            header.join(",")
        )));
    }
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) => {
                let line = r.position().map(|p| p.line()).unwrap_or(0);
                if r.len() < 2 {
                    bad.push(format!("line {line}: missing the dsn column"));
                    continue;
                }
                let labels = header[2..]
                    .iter()
                    .zip(r.iter().skip(2))
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect();
                rows.push((line, r[0].to_string(), r[1].to_string(), labels));
            }
            // Neither message echoes field values (a DSN may hold a password).
            Err(e) => bad.push(match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    pos,
                    expected_len,
                    len,
                } => format!(
                    "line {}: {len} fields, the header has {expected_len}",
                    pos.as_ref().map(|p| p.line()).unwrap_or(0)
                ),
                _ => e.to_string(),
            }),
        }
    }
    if !bad.is_empty() {
        bad.truncate(MAX_LISTED);
        return Err(TargetError::Rows {
            origin: origin.to_string(),
            rows: bad,
        });
    }
    build(origin, rows)
}

/// Session settings of a catalog or discovery connection: a catalog query is a read
/// that must end, whatever it was asked to do.
fn source_settings() -> SessionSettings {
    SessionSettings {
        lock_timeout: Duration::from_secs(5),
        statement_timeout: SOURCE_STATEMENT_TIMEOUT,
        ..SessionSettings::default()
    }
}

/// How long a catalog query or a discovery may run.
pub const SOURCE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one statement with `params` in a `READ ONLY` transaction on the server of
/// `dsn_text`, over the extended protocol (so a second statement is refused, not run),
/// fetching at most `max_rows + 1` rows through a portal: a catalog that returns a
/// million rows costs one row more than the limit, not a million. The transaction is
/// rolled back: nothing a source query does can stay.
async fn read_rows(
    dsn: &Dsn,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    max_rows: usize,
    reach: &Reach,
) -> Result<(Vec<String>, Vec<tokio_postgres::Row>), String> {
    let mut session = Session::connect(dsn, &source_settings(), reach)
        .await
        .map_err(|f| f.to_string())?;
    let db_error = |e: tokio_postgres::Error| crate::failure::DbFailure::from(&e).to_string();
    let read = async {
        let tx = session
            .client_mut()
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(db_error)?;
        let statement = tx.prepare(sql).await.map_err(db_error)?;
        let columns = statement
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let portal = tx.bind(&statement, params).await.map_err(db_error)?;
        let limit = i32::try_from(max_rows.saturating_add(1)).unwrap_or(i32::MAX);
        let rows = tx.query_portal(&portal, limit).await.map_err(db_error)?;
        tx.rollback().await.map_err(db_error)?;
        Ok((columns, rows))
    };
    // The server enforces the statement timeout; this bounds a server that stops
    // answering altogether (a start or plan must not hang on it).
    let limit = SOURCE_STATEMENT_TIMEOUT + Duration::from_secs(15);
    let result = tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
    session.close().await;
    result
}

/// A result cell as text: text-like and integer columns as they are, NULL as `None`;
/// any other type asks for a cast rather than guessing a rendering.
fn cell_text(row: &tokio_postgres::Row, i: usize) -> Result<Option<String>, String> {
    use tokio_postgres::types::Type;
    let column = &row.columns()[i];
    let ty = column.type_();
    let text = match *ty {
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => row
            .try_get::<_, Option<String>>(i)
            .map_err(|e| e.to_string())?,
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(|e| e.to_string())?
            .map(|v| v.to_string()),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(|e| e.to_string())?
            .map(|v| v.to_string()),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(|e| e.to_string())?
            .map(|v| v.to_string()),
        Type::UUID => row
            .try_get::<_, Option<uuid::Uuid>>(i)
            .map_err(|e| e.to_string())?
            .map(|v| v.to_string()),
        _ => {
            return Err(format!(
                "column {:?} has type {}; cast it to text in the query ({}::text)",
                column.name(),
                ty.name(),
                column.name()
            ));
        }
    };
    Ok(text)
}

fn too_many(origin: &str, max_tenants: usize) -> TargetError {
    TargetError::Source {
        origin: origin.to_string(),
        message: format!(
            "more than {max_tenants} tenants, over the daemon's limit (limits.max_tenants)"
        ),
    }
}

async fn catalog(
    dsn_text: &str,
    query: &str,
    reach: &Reach,
    max_tenants: usize,
) -> Result<Vec<Tenant>, TargetError> {
    let origin = "catalog query";
    let source_error = |message: String| TargetError::Source {
        origin: origin.to_string(),
        message,
    };
    let dsn = Dsn::parse(dsn_text).map_err(|e| source_error(format!("catalog_dsn: {e}")))?;
    let (columns, result) = read_rows(&dsn, query, &[], max_tenants, reach)
        .await
        .map_err(|e| source_error(format!("{dsn}: {e}")))?;
    if columns.len() < 2 {
        return Err(source_error(format!(
            "the query must return tenant_id, dsn[, labels…]; it returns {columns:?}"
        )));
    }
    if result.len() > max_tenants {
        return Err(too_many(origin, max_tenants));
    }
    let mut rows = Vec::with_capacity(result.len());
    for (n, r) in result.iter().enumerate() {
        let line = n as u64 + 1;
        let cell = |i: usize| cell_text(r, i).map_err(|e| source_error(format!("row {line}: {e}")));
        let mut labels = BTreeMap::new();
        for (i, name) in columns.iter().enumerate().skip(2) {
            if let Some(v) = cell(i)? {
                labels.insert(name.clone(), v);
            }
        }
        rows.push((
            line,
            cell(0)?.unwrap_or_default(),
            cell(1)?.unwrap_or_default(),
            labels,
        ));
    }
    build(&format!("{origin} (row numbers count result rows)"), rows)
}

async fn discover(
    dsn_text: &str,
    pattern: &str,
    reach: &Reach,
    max_tenants: usize,
) -> Result<Vec<Tenant>, TargetError> {
    let origin = format!("discovery of {pattern:?}");
    let source_error = |message: String| TargetError::Source {
        origin: origin.clone(),
        message,
    };
    let server = Dsn::parse(dsn_text).map_err(|e| source_error(format!("server_dsn: {e}")))?;
    let sql = "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate \
               AND datname LIKE $1 ORDER BY datname";
    let (_, result) = read_rows(&server, sql, &[&pattern], max_tenants, reach)
        .await
        .map_err(|e| source_error(format!("{server}: {e}")))?;
    if result.len() > max_tenants {
        return Err(too_many(&origin, max_tenants));
    }
    let mut tenants = Vec::with_capacity(result.len());
    for r in &result {
        let name: String = r.try_get(0).map_err(|e| source_error(e.to_string()))?;
        let dsn = server
            .with_dbname(&name)
            .map_err(|e| source_error(e.to_string()))?;
        tenants.push(Tenant {
            id: name,
            dsn,
            labels: BTreeMap::new(),
        });
    }
    if tenants.is_empty() {
        return Err(TargetError::Empty { origin });
    }
    Ok(tenants)
}

/// Refuses, naming them, the tenants whose servers `allowed_hosts` does not allow: a
/// wave is refused at start rather than failing those tenants one by one.
pub fn check_reach(tenants: &[Tenant], reach: &Reach, origin: &str) -> Result<(), TargetError> {
    let mut bad: Vec<String> = tenants
        .iter()
        .filter_map(|t| {
            reach
                .check(&t.dsn)
                .err()
                .map(|e| format!("tenant {:?}: {e}", t.id))
        })
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let more = bad.len().saturating_sub(MAX_LISTED);
    bad.truncate(MAX_LISTED);
    if more > 0 {
        bad.push(format!("… and {more} more"));
    }
    Err(TargetError::Rows {
        origin: origin.to_string(),
        rows: bad,
    })
}

/// Runs `visit` on every tenant, at most `concurrency` at once and at most `per_host` on
/// one server (both at least 1), and returns the results in the tenants' order. The
/// host's permit is taken first, so a busy server does not hold global slots. A visit
/// that panics leaves `None` in its place (logged), never the whole fan-out.
pub async fn visit_bounded<T, F, Fut>(
    tenants: Vec<Tenant>,
    concurrency: usize,
    per_host: usize,
    visit: F,
) -> Vec<Option<T>>
where
    T: Send + 'static,
    F: Fn(Tenant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let visit = Arc::new(visit);
    let mut hosts: std::collections::HashMap<String, Arc<Semaphore>> = Default::default();
    let mut set = tokio::task::JoinSet::new();
    let count = tenants.len();
    for (i, tenant) in tenants.into_iter().enumerate() {
        let host = hosts
            .entry(tenant.dsn.host().to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(per_host.max(1))))
            .clone();
        let (permits, visit) = (permits.clone(), visit.clone());
        set.spawn(async move {
            let _host = host.acquire_owned().await;
            let _permit = permits.acquire_owned().await;
            (i, visit(tenant).await)
        });
    }
    let mut out: Vec<Option<T>> = (0..count).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((i, result)) => out[i] = Some(result),
            Err(e) => tracing::error!(error = %e, "a tenant visit panicked"),
        }
    }
    out
}

/// Each tenant's database size in bytes, by tenant id, for `--order size`: one query per
/// server (`pg_database_size` of its tenants' databases, through the first tenant's
/// connection string), a few servers at a time. A server that cannot be asked leaves its
/// tenants without a size (they start last); it is logged, not an error.
pub async fn database_sizes(
    tenants: &[Tenant],
    reach: &Reach,
) -> std::collections::HashMap<String, u64> {
    use futures_util::StreamExt as _;
    // Owned: the futures below must not borrow from the stream's items.
    let mut by_host: BTreeMap<String, Vec<(String, Dsn)>> = BTreeMap::new();
    for t in tenants {
        by_host
            .entry(t.dsn.host().to_string())
            .or_default()
            .push((t.id.clone(), t.dsn.clone()));
    }
    let settings = SessionSettings::catalog_reader(Duration::from_secs(30));
    let settings = &settings;
    let per_host: Vec<Vec<(String, u64)>> = futures_util::stream::iter(by_host)
        .map(|(host, group)| async move {
            let names: Vec<String> = group
                .iter()
                .map(|(_, dsn)| crate::apply::log::quote_literal(dsn.dbname()))
                .collect();
            let sql = format!(
                "SELECT datname, CASE WHEN pg_catalog.has_database_privilege(oid, 'CONNECT') \
                 THEN pg_catalog.pg_database_size(oid) END FROM pg_catalog.pg_database \
                 WHERE datname IN ({})",
                names.join(", ")
            );
            let Some((_, first)) = group.first() else {
                return Vec::new();
            };
            let session = match Session::connect(first, settings, reach).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot read database sizes; those tenants start last");
                    return Vec::new();
                }
            };
            let rows = session.client().simple_query(&sql).await;
            session.close().await;
            let Ok(rows) = rows else {
                tracing::warn!(host = %host, "cannot read database sizes; those tenants start last");
                return Vec::new();
            };
            let sizes: std::collections::HashMap<String, u64> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                        r.get(0)?.to_string(),
                        r.get(1)?.parse().ok()?,
                    )),
                    _ => None,
                })
                .collect();
            group
                .iter()
                .filter_map(|(id, dsn)| Some((id.clone(), *sizes.get(dsn.dbname())?)))
                .collect::<Vec<_>>()
        })
        .buffer_unordered(8)
        .collect()
        .await;
    per_host.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_labels() {
        let t = parse_csv(
            "tenant_id,dsn,region,tier\nacme,postgresql://u@h1/acme,eu,gold\nglobex,host=h2 dbname=globex user=u,us,\n",
            "t.csv",
        )
        .expect("parses");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].labels.get("region").map(String::as_str), Some("eu"));
        assert_eq!(
            t[1].labels.get("tier"),
            None,
            "empty label cells are absent"
        );
        assert_eq!(t[1].dsn.host(), "h2:5432");
    }

    #[test]
    fn csv_errors_name_lines() {
        let err = parse_csv(
            "tenant_id,dsn\na,postgresql://u@h/a\na,postgresql://u@h/a2\nb,host=h sslmode=bogus password=pw\n,postgresql://u@h/c\n",
            "t.csv",
        )
        .expect_err("bad rows");
        let text = err.to_string();
        assert!(text.contains("line 3: duplicate tenant_id \"a\""), "{text}");
        assert!(
            text.contains("line 4: tenant \"b\": invalid connection string: sslmode"),
            "{text}"
        );
        assert!(text.contains("line 5: empty tenant_id"), "{text}");
        assert!(!text.contains("pw"), "{text}");
    }

    #[test]
    fn csv_structure_errors() {
        let e = parse_csv("id,url\nx,y\n", "t.csv").expect_err("header");
        assert!(e.to_string().contains("tenant_id,dsn"), "{e}");
        let e = parse_csv("tenant_id,dsn\n", "t.csv").expect_err("empty");
        assert_eq!(
            e,
            TargetError::Empty {
                origin: "t.csv".into()
            }
        );
        let e =
            parse_csv("tenant_id,dsn,region\na,postgresql://u@h/a\n", "t.csv").expect_err("ragged");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse_csv("tenant_id,dsn\na\n", "t.csv").expect_err("missing dsn");
        assert!(e.to_string().contains("t.csv"), "{e}");
    }
}
