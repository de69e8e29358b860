//! Targets: which tenant databases a wave covers (PRODUCT.md §3). A CSV file
//! (`tenant_id,dsn[,labels…]`), a catalog query run through a bb8 pool on the catalog
//! database, or discovery of every database on a server whose name matches a `LIKE`
//! pattern. Every source is validated as a whole: duplicate ids, bad DSNs, missing columns
//! and an empty set are reported with the first offending rows and their line numbers.
//! This module resolves targets; it never applies anything.

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::SimpleQueryMessage;

use crate::dsn::{Dsn, TlsMode};

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

/// Resolves `source` into tenants, in the order the source gives them.
pub async fn resolve(source: &TargetSource) -> Result<Vec<Tenant>, TargetError> {
    match source {
        TargetSource::Csv { text, origin } => parse_csv(text, origin),
        TargetSource::Catalog { dsn, query } => catalog(dsn, query).await,
        TargetSource::Discover { dsn, pattern } => discover(dsn, pattern).await,
    }
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

async fn simple_query(
    dsn_text: &str,
    sql: &str,
    origin: &str,
) -> Result<Vec<SimpleQueryMessage>, TargetError> {
    let source_error = |message: String| TargetError::Source {
        origin: origin.to_string(),
        message,
    };
    let dsn = Dsn::parse(dsn_text).map_err(|e| source_error(e.to_string()))?;
    let mut config = dsn.config().clone();
    config.application_name(crate::connect::APPLICATION_NAME);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let result = match dsn.tls() {
        TlsMode::Plain => pooled_query(config, tokio_postgres::NoTls, sql).await,
        mode => match crate::connect::tls_config(mode, &dsn) {
            Ok(tls) => {
                pooled_query(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new(tls),
                    sql,
                )
                .await
            }
            Err(e) => Err(e.to_string()),
        },
    };
    result.map_err(|e| source_error(format!("{dsn}: {e}")))
}

/// Runs `sql` on a connection from a small bb8 pool; errors as text without secrets.
async fn pooled_query<T>(
    config: tokio_postgres::Config,
    tls: T,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>, String>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync,
    T::TlsConnect: Send + Sync,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let db_error = |e: tokio_postgres::Error| crate::failure::DbFailure::from(&e).to_string();
    let manager = bb8_postgres::PostgresConnectionManager::new(config, tls);
    let pool = bb8::Pool::builder().max_size(1).build_unchecked(manager);
    // A dedicated connection reports why connecting failed at once; `get` would keep
    // retrying until its timeout and then only say that it timed out.
    let conn = pool.dedicated_connection().await.map_err(db_error)?;
    conn.simple_query(sql).await.map_err(db_error)
}

async fn catalog(dsn: &str, query: &str) -> Result<Vec<Tenant>, TargetError> {
    let origin = "catalog query";
    let messages = simple_query(dsn, query, origin).await?;
    let mut rows = Vec::new();
    let mut n = 0u64;
    for m in &messages {
        let SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        n += 1;
        let columns: Vec<&str> = r.columns().iter().map(|c| c.name()).collect();
        if columns.len() < 2 {
            return Err(TargetError::Source {
                origin: origin.into(),
                message: format!(
                    "the query must return tenant_id, dsn[, labels…]; it returns {columns:?}"
                ),
            });
        }
        let labels = (2..columns.len())
            .filter_map(|i| r.get(i).map(|v| (columns[i].to_string(), v.to_string())))
            .collect();
        rows.push((
            n,
            r.get(0).unwrap_or_default().to_string(),
            r.get(1).unwrap_or_default().to_string(),
            labels,
        ));
    }
    build(&format!("{origin} (row numbers count result rows)"), rows)
}

async fn discover(dsn_text: &str, pattern: &str) -> Result<Vec<Tenant>, TargetError> {
    let origin = format!("discovery of {pattern:?}");
    let server = Dsn::parse(dsn_text).map_err(|e| TargetError::Source {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    let sql = format!(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate \
         AND datname LIKE {} ORDER BY datname",
        crate::apply::log::quote_literal(pattern)
    );
    let messages = simple_query(dsn_text, &sql, &origin).await?;
    let mut tenants = Vec::new();
    for m in &messages {
        let SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        let name = r.get(0).unwrap_or_default();
        let dsn = server.with_dbname(name).map_err(|e| TargetError::Source {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        tenants.push(Tenant {
            id: name.to_string(),
            dsn,
            labels: BTreeMap::new(),
        });
    }
    if tenants.is_empty() {
        return Err(TargetError::Empty { origin });
    }
    Ok(tenants)
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
