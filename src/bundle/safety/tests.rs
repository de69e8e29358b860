use super::*;

fn findings(sql: &str) -> Vec<(String, Option<String>)> {
    let b = Bundle::from_sources(&[("V2__change.sql", sql)], "test").expect("valid");
    lint(&b)
        .into_iter()
        .map(|f| (f.rule.to_string(), f.table))
        .collect()
}

fn rules(sql: &str) -> Vec<String> {
    findings(sql).into_iter().map(|(r, _)| r).collect()
}

/// Each rule fires on its statement, naming the table, and is quiet on the safe pattern.
#[test]
fn every_rule_fires_and_its_safe_pattern_does_not() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "require-concurrent-index-creation",
            "CREATE INDEX items_name ON app.items (name);",
            "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY items_name ON app.items (name);",
        ),
        (
            "require-concurrent-index-creation",
            "CREATE UNIQUE INDEX IF NOT EXISTS items_email ON items USING btree (lower(email));",
            "-- flotilla:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS items_email ON items (lower(email));",
        ),
        (
            "require-concurrent-index-deletion",
            "DROP INDEX items_name;",
            "-- flotilla:no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS items_name;",
        ),
        (
            "changing-column-type",
            "ALTER TABLE items ALTER COLUMN id TYPE bigint;",
            "ALTER TABLE items ADD COLUMN id_big bigint;",
        ),
        (
            "changing-column-type",
            "ALTER TABLE items ALTER id SET DATA TYPE bigint;",
            "ALTER TABLE items ALTER COLUMN id SET DEFAULT 0;",
        ),
        (
            "adding-not-nullable-field",
            "ALTER TABLE items ALTER COLUMN name SET NOT NULL;",
            "ALTER TABLE items VALIDATE CONSTRAINT name_nn;\n\
             ALTER TABLE items ALTER COLUMN name SET NOT NULL;",
        ),
        (
            "adding-foreign-key-constraint",
            "ALTER TABLE items ADD CONSTRAINT items_owner FOREIGN KEY (owner) REFERENCES users (id);",
            "ALTER TABLE items ADD CONSTRAINT items_owner FOREIGN KEY (owner) REFERENCES users (id) NOT VALID;",
        ),
        (
            "adding-foreign-key-constraint",
            "ALTER TABLE items ADD COLUMN owner bigint REFERENCES users (id);",
            "ALTER TABLE items ADD COLUMN owner bigint;",
        ),
        (
            "constraint-missing-not-valid",
            "ALTER TABLE items ADD CONSTRAINT positive CHECK (price > 0);",
            "ALTER TABLE items ADD CONSTRAINT positive CHECK (price > 0) NOT VALID;",
        ),
        (
            "disallowed-unique-constraint",
            "ALTER TABLE items ADD CONSTRAINT items_email_key UNIQUE (email);",
            "ALTER TABLE items ADD CONSTRAINT items_email_key UNIQUE USING INDEX items_email;",
        ),
        (
            "disallowed-unique-constraint",
            "ALTER TABLE items ADD PRIMARY KEY (id);",
            "ALTER TABLE items ADD CONSTRAINT items_pkey PRIMARY KEY USING INDEX items_id;",
        ),
        (
            "adding-field-with-default",
            "ALTER TABLE items ADD COLUMN token uuid DEFAULT gen_random_uuid();",
            "ALTER TABLE items ADD COLUMN created timestamptz DEFAULT now();",
        ),
        (
            "adding-field-with-default",
            "ALTER TABLE items ADD COLUMN seq bigserial;",
            "ALTER TABLE items ADD COLUMN seq bigint;",
        ),
        (
            "adding-field-with-default",
            "ALTER TABLE items ADD COLUMN total numeric GENERATED ALWAYS AS (price * 2) STORED;",
            "ALTER TABLE items ADD COLUMN total numeric;",
        ),
        (
            "ban-drop-column",
            "ALTER TABLE items DROP COLUMN legacy;",
            "ALTER TABLE items DROP CONSTRAINT IF EXISTS legacy_check;",
        ),
        (
            "renaming-table",
            "ALTER TABLE items RENAME TO products;",
            "CREATE VIEW products AS SELECT * FROM items;",
        ),
        (
            "renaming-column",
            "ALTER TABLE items RENAME COLUMN name TO title;",
            "ALTER TABLE items RENAME CONSTRAINT a TO b;",
        ),
        (
            "ban-vacuum-full",
            "-- flotilla:no-transaction\nVACUUM FULL items;",
            "-- flotilla:no-transaction\nVACUUM (ANALYZE) items;",
        ),
        (
            "ban-cluster",
            "-- flotilla:no-transaction\nCLUSTER items USING items_pkey;",
            "ANALYZE items;",
        ),
    ];
    for (rule, risky, safe) in cases {
        assert_eq!(rules(risky), [*rule], "{risky}");
        assert!(rules(safe).is_empty(), "{safe}: {:?}", rules(safe));
    }
    // Every rule has a case.
    for (id, _) in RULES {
        assert!(cases.iter().any(|(r, _, _)| r == id), "no case for {id}");
    }
}

#[test]
fn a_table_created_in_the_same_script_is_exempt() {
    assert!(
        rules(
            "CREATE TABLE IF NOT EXISTS app.items (id int);\n\
             CREATE INDEX items_id ON app.items (id);\n\
             ALTER TABLE app.items ADD CONSTRAINT items_pk PRIMARY KEY (id);\n\
             ALTER TABLE app.items ALTER COLUMN id SET NOT NULL;"
        )
        .is_empty()
    );
    // …but not one created by another script, nor another table.
    assert_eq!(
        findings("CREATE TABLE a (id int);\nCREATE INDEX b_id ON b (id);"),
        [(
            "require-concurrent-index-creation".to_string(),
            Some("b".to_string())
        )]
    );
}

#[test]
fn several_actions_of_one_alter_table_are_each_checked() {
    assert_eq!(
        rules("ALTER TABLE items DROP COLUMN a, ALTER COLUMN b TYPE text, ADD COLUMN c int;"),
        ["ban-drop-column", "changing-column-type"]
    );
}

#[test]
fn a_script_waiver_names_its_reason_and_unknown_rules_are_refused() {
    let b = Bundle::from_sources(
        &[(
            "V3__drop.sql",
            "-- flotilla:allow ban-drop-column nothing reads it since release 4.2\n\
             ALTER TABLE items DROP COLUMN legacy;",
        )],
        "test",
    )
    .expect("valid");
    let f = lint(&b);
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].waived_by_script.as_deref(),
        Some("nothing reads it since release 4.2")
    );
    assert_eq!(f[0].line, Some(2));
    for (bad, says) in [
        (
            "-- flotilla:allow ban-everything because\nselect 1;",
            "no such rule",
        ),
        (
            "-- flotilla:allow ban-drop-column\nselect 1;",
            "needs a reason",
        ),
    ] {
        let e = Bundle::from_sources(&[("V1__a.sql", bad)], "t").expect_err(bad);
        assert!(e.to_string().contains(says), "{e}");
    }
}

/// No false positive on the bundles the project ships as examples.
#[test]
fn the_example_bundles_are_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["examples/saas-bundle", "tests/fixtures/bundles/good"] {
        let b = Bundle::load_dir(&root.join(dir)).expect(dir);
        let found = lint(&b);
        assert!(found.is_empty(), "{dir}: {found:?}");
    }
}

/// The reviewers' cases.
#[test]
fn validate_in_the_altering_transaction_identity_columns_and_partitioned_parents() {
    assert_eq!(
        rules(
            "ALTER TABLE items ADD CONSTRAINT positive CHECK (price > 0) NOT VALID;\n\
             ALTER TABLE items VALIDATE CONSTRAINT positive;"
        ),
        ["constraint-missing-not-valid"]
    );
    // In a script of its own (its own transaction), VALIDATE is the safe step.
    assert!(rules("ALTER TABLE items VALIDATE CONSTRAINT positive;").is_empty());
    assert_eq!(
        rules("ALTER TABLE items ADD COLUMN id2 bigint GENERATED ALWAYS AS IDENTITY;"),
        ["adding-field-with-default"]
    );
    assert!(rules("CREATE INDEX measurements_at ON ONLY measurements (at);").is_empty());
    // Another schema's table of the same name is not the one created here.
    assert_eq!(
        rules("CREATE TABLE items (id int);\nCREATE INDEX audit_items_id ON audit.items (id);"),
        ["require-concurrent-index-creation"]
    );
    assert!(
        rules("CREATE TABLE items (id int);\nCREATE INDEX items_id ON public.items (id);")
            .is_empty()
    );
}

#[test]
fn a_wave_can_waive_one_script_that_already_ran() {
    let b = Bundle::from_sources(
        &[
            ("V3__old.sql", "CREATE INDEX items_a ON items (a);"),
            ("V4__new.sql", "CREATE INDEX items_b ON items (b);"),
        ],
        "test",
    )
    .expect("valid");
    let found = lint(&b);
    let left = unwaived(
        &found,
        &["require-concurrent-index-creation@V3__old.sql".to_string()],
    );
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].script, "V4__new.sql");
    assert!(is_allow_entry("ban-drop-column@V1__x.sql"));
    assert!(!is_allow_entry("ban-everything@V1__x.sql"));
    assert!(!is_allow_entry("ban-drop-column@"));
}
