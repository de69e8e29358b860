//! Splits a SQL script into statements by PostgreSQL's lexical rules, the way `psql` does.
//!
//! This module owns the lexing of script text: quotes (`'…'` with `''`, `E'…'` with
//! backslash escapes), quoted identifiers (`"…"` with `""`), dollar quotes with tags,
//! `--` comments and nested `/* */` comments, parentheses, and psql's heuristic for
//! `CREATE FUNCTION … BEGIN ATOMIC … END` bodies, whose semicolons do not end the
//! statement. It never interprets what a statement means beyond handing out its leading
//! tokens; classification lives in `bundle::rules`. The pieces it returns cover the input
//! exactly, so re-joining them gives back the original text byte for byte.

use std::ops::Range;

/// One significant token near the start of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An unquoted identifier or keyword, folded to lower case as PostgreSQL does.
    Word(String),
    /// A `"quoted"` identifier, exactly as written between the quotes.
    Quoted(String),
    /// A single ASCII punctuation or operator character, such as `(`, `.` or `,`.
    Punct(u8),
    /// A string, number, parameter or anything else that is not a name.
    Literal,
}

/// A piece of a script: one statement with the whitespace and comments before it, up to
/// and including its terminating `;` (the last piece may lack one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte range of the piece in the script.
    pub range: Range<usize>,
    /// Byte offset of the first significant token; `None` for a piece that holds only
    /// whitespace and comments.
    pub first_token: Option<usize>,
    /// The first [`MAX_LEADING_TOKENS`] significant tokens, outside nothing (parentheses
    /// included as tokens), enough to classify the statement.
    pub leading: Vec<Token>,
}

/// How many leading tokens a [`Statement`] keeps.
pub const MAX_LEADING_TOKENS: usize = 48;

impl Statement {
    /// True when the piece holds no SQL at all, only whitespace and comments.
    pub fn is_blank(&self) -> bool {
        self.first_token.is_none()
    }

    /// The piece's text within `script`.
    pub fn text<'a>(&self, script: &'a str) -> &'a str {
        &script[self.range.clone()]
    }

    /// The statement without leading whitespace and comments (still with its `;`).
    pub fn sql<'a>(&self, script: &'a str) -> &'a str {
        match self.first_token {
            Some(start) => &script[start..self.range.end],
            None => "",
        }
    }
}

/// Text that opened a quote or comment and never closed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unterminated {what} starting here")]
pub struct LexError {
    /// What was left open: "string literal", "quoted identifier", "dollar quote $fn$", …
    pub what: String,
    /// Byte offset where it was opened.
    pub offset: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn is_dollar_tag_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// psql's heuristic state for `CREATE [OR REPLACE] {FUNCTION|PROCEDURE} … BEGIN ATOMIC`.
#[derive(Default)]
struct BodyTracker {
    heads: [u8; 4],
    identifiers: usize,
    begin_depth: usize,
}

impl BodyTracker {
    fn identifier(&mut self, word: &str, paren_depth: usize) {
        if matches!(word, "create" | "function" | "procedure" | "or" | "replace")
            && self.identifiers < self.heads.len()
        {
            self.heads[self.identifiers] = word.as_bytes()[0];
        }
        self.identifiers += 1;
        let h = self.heads;
        let in_routine = h[0] == b'c'
            && (h[1] == b'f'
                || h[1] == b'p'
                || (h[1] == b'o' && h[2] == b'r' && (h[3] == b'f' || h[3] == b'p')));
        if in_routine && paren_depth == 0 {
            match word {
                "begin" => self.begin_depth += 1,
                // CASE also ends with END; it only matters inside a BEGIN.
                "case" if self.begin_depth >= 1 => self.begin_depth += 1,
                "end" => self.begin_depth = self.begin_depth.saturating_sub(1),
                _ => {}
            }
        }
    }
}

/// Splits `sql` into pieces that cover it exactly (see [`Statement`]).
pub fn split(sql: &str) -> Result<Vec<Statement>, LexError> {
    split_keeping(sql, MAX_LEADING_TOKENS)
}

/// Every significant token of one statement's text (not only the leading ones), for
/// rules that read a whole statement (the safety lint). Text that does not lex gives
/// what lexed before the problem.
pub fn tokens(statement: &str) -> Vec<Token> {
    split_keeping(statement, usize::MAX)
        .ok()
        .and_then(|mut pieces| {
            let first = pieces.iter().position(|p| !p.is_blank())?;
            Some(pieces.swap_remove(first).leading)
        })
        .unwrap_or_default()
}

/// [`split`], keeping up to `keep` leading tokens per piece.
fn split_keeping(sql: &str, keep: usize) -> Result<Vec<Statement>, LexError> {
    let b = sql.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut first_token: Option<usize> = None;
    let mut leading: Vec<Token> = Vec::new();
    let mut paren_depth = 0usize;
    let mut body = BodyTracker::default();
    let mut i = 0;

    let push = |leading: &mut Vec<Token>, first: &mut Option<usize>, at: usize, t: Token| {
        if first.is_none() {
            *first = Some(at);
        }
        if leading.len() < keep {
            leading.push(t);
        }
    };

    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        match c {
            b'-' if next == Some(b'-') => {
                i = match memchr(b'\n', &b[i..]) {
                    Some(n) => i + n + 1,
                    None => b.len(),
                };
            }
            b'/' if next == Some(b'*') => {
                i = skip_block_comment(b, i)?;
            }
            b'\'' => {
                push(&mut leading, &mut first_token, i, Token::Literal);
                i = skip_quoted(b, i, b'\'', false, "string literal")?;
            }
            b'e' | b'E' if next == Some(b'\'') => {
                push(&mut leading, &mut first_token, i, Token::Literal);
                i = skip_quoted(b, i + 1, b'\'', true, "escape string literal")?;
            }
            b'"' => {
                let end = skip_quoted(b, i, b'"', false, "quoted identifier")?;
                let name = sql[i + 1..end - 1].replace("\"\"", "\"");
                push(&mut leading, &mut first_token, i, Token::Quoted(name));
                i = end;
            }
            b'$' => {
                push(&mut leading, &mut first_token, i, Token::Literal);
                i = match dollar_tag(b, i) {
                    Some(tag_end) => {
                        let tag = &b[i..tag_end];
                        match find(&b[tag_end..], tag) {
                            Some(n) => tag_end + n + tag.len(),
                            None => {
                                return Err(LexError {
                                    what: format!("dollar quote {}", &sql[i..tag_end]),
                                    offset: i,
                                });
                            }
                        }
                    }
                    // `$1` parameter or a lone `$`.
                    None => {
                        let mut j = i + 1;
                        while j < b.len() && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        j
                    }
                };
            }
            c if is_ident_start(c) => {
                let mut j = i + 1;
                while j < b.len() && is_ident_cont(b[j]) {
                    j += 1;
                }
                let word = sql[i..j].to_ascii_lowercase();
                body.identifier(&word, paren_depth);
                push(&mut leading, &mut first_token, i, Token::Word(word));
                i = j;
            }
            c if c.is_ascii_digit() => {
                let mut j = i + 1;
                while j < b.len() && (is_ident_cont(b[j]) || b[j] == b'.') {
                    j += 1;
                }
                push(&mut leading, &mut first_token, i, Token::Literal);
                i = j;
            }
            b'(' => {
                paren_depth += 1;
                push(&mut leading, &mut first_token, i, Token::Punct(c));
                i += 1;
            }
            b')' => {
                paren_depth = paren_depth.saturating_sub(1);
                push(&mut leading, &mut first_token, i, Token::Punct(c));
                i += 1;
            }
            b';' if paren_depth == 0 && body.begin_depth == 0 => {
                i += 1;
                pieces.push(Statement {
                    range: start..i,
                    first_token: first_token.take(),
                    leading: std::mem::take(&mut leading),
                });
                start = i;
                body = BodyTracker::default();
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                push(&mut leading, &mut first_token, i, Token::Punct(c));
                i += 1;
            }
        }
    }
    if start < b.len() {
        pieces.push(Statement {
            range: start..b.len(),
            first_token,
            leading,
        });
    }
    Ok(pieces)
}

/// The end of a `$tag$` opening at `i`, if one does.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if j < b.len() && b[j] == b'$' {
        return Some(j + 1);
    }
    if j >= b.len() || !is_ident_start(b[j]) {
        return None;
    }
    while j < b.len() && is_dollar_tag_cont(b[j]) {
        j += 1;
    }
    (j < b.len() && b[j] == b'$').then_some(j + 1)
}

/// Skips a quoted run opening at `i` with `quote`; returns the offset after its close.
fn skip_quoted(
    b: &[u8],
    i: usize,
    quote: u8,
    backslash_escapes: bool,
    what: &str,
) -> Result<usize, LexError> {
    let mut j = i + 1;
    while j < b.len() {
        let c = b[j];
        if backslash_escapes && c == b'\\' {
            j += 2;
            continue;
        }
        if c == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(LexError {
        what: what.to_string(),
        offset: i,
    })
}

fn skip_block_comment(b: &[u8], i: usize) -> Result<usize, LexError> {
    let mut depth = 0usize;
    let mut j = i;
    while j + 1 < b.len() {
        match (b[j], b[j + 1]) {
            (b'/', b'*') => {
                depth += 1;
                j += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                j += 2;
                if depth == 0 {
                    return Ok(j);
                }
            }
            _ => j += 1,
        }
    }
    Err(LexError {
        what: "block comment".to_string(),
        offset: i,
    })
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&c| c == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Maps byte offsets of one text to 1-based line numbers.
#[derive(Debug, Clone)]
pub struct LineIndex {
    newlines: Vec<usize>,
}

impl LineIndex {
    /// Indexes the newlines of `text`.
    pub fn new(text: &str) -> Self {
        Self {
            newlines: text
                .bytes()
                .enumerate()
                .filter_map(|(i, c)| (c == b'\n').then_some(i))
                .collect(),
        }
    }

    /// The 1-based line holding byte `offset`.
    pub fn line(&self, offset: usize) -> u32 {
        let before = self.newlines.partition_point(|&n| n < offset);
        u32::try_from(before + 1).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmts(sql: &str) -> Vec<&str> {
        split(sql)
            .expect("lexes")
            .iter()
            .filter(|s| !s.is_blank())
            .map(|s| s.sql(sql))
            .collect()
    }

    #[test]
    fn plain_statements() {
        assert_eq!(
            stmts("create table a(x int);\ninsert into a values (1);\n"),
            ["create table a(x int);", "insert into a values (1);"]
        );
    }

    #[test]
    fn last_statement_without_semicolon() {
        assert_eq!(stmts("select 1; select 2"), ["select 1;", "select 2"]);
    }

    #[test]
    fn semicolons_in_strings_and_identifiers() {
        assert_eq!(
            stmts("select 'a;b', 'it''s;'; create table \"x;y\"(\"a\"\"b;\" int);"),
            [
                "select 'a;b', 'it''s;';",
                "create table \"x;y\"(\"a\"\"b;\" int);"
            ]
        );
    }

    #[test]
    fn escape_strings() {
        assert_eq!(
            stmts(r"select E'\';'; select e'a\\'; select 'b\'; select 1;"),
            [
                r"select E'\';';",
                r"select e'a\\';",
                r"select 'b\';",
                "select 1;"
            ]
        );
    }

    #[test]
    fn identifier_ending_in_e_is_not_an_escape_string() {
        // `somE` is an identifier; the string after it follows standard rules.
        assert_eq!(
            stmts(r"select somE'\'; select 1;"),
            [r"select somE'\';", "select 1;"]
        );
    }

    #[test]
    fn dollar_quotes_with_tags() {
        let sql = "create function f() returns int as $fn$ select 1; $$ nested; $$ $fn$ language sql;\nselect $$a;b$$;";
        assert_eq!(
            stmts(sql),
            [
                "create function f() returns int as $fn$ select 1; $$ nested; $$ $fn$ language sql;",
                "select $$a;b$$;"
            ]
        );
    }

    #[test]
    fn dollar_quote_inside_string_is_not_a_quote() {
        assert_eq!(
            stmts("select '$$'; select 2;"),
            ["select '$$';", "select 2;"]
        );
    }

    #[test]
    fn dollar_in_identifier_and_parameters() {
        assert_eq!(
            stmts("select a$b$c from t where x = $1; select 2;"),
            ["select a$b$c from t where x = $1;", "select 2;"]
        );
    }

    #[test]
    fn double_dollar_inside_comments_is_ignored() {
        assert_eq!(
            stmts("-- $$ not a quote;\nselect 1; /* $$ ; */ select 2;"),
            ["select 1;", "select 2;"]
        );
    }

    #[test]
    fn nested_block_comments() {
        assert_eq!(
            stmts("/* outer /* inner; */ still; */ select 1; select 2;"),
            ["select 1;", "select 2;"]
        );
    }

    #[test]
    fn begin_atomic_bodies_keep_their_semicolons() {
        let sql = "create or replace function f(a int) returns int language sql begin atomic select case when a > 0 then 1 else 2 end; select 3; end;\nselect 4;";
        assert_eq!(
            stmts(sql),
            [
                "create or replace function f(a int) returns int language sql begin atomic select case when a > 0 then 1 else 2 end; select 3; end;",
                "select 4;"
            ]
        );
    }

    #[test]
    fn plpgsql_body_in_dollar_quotes() {
        let sql = "do $$ begin perform 1; end $$;\nbegin; commit;";
        assert_eq!(
            stmts(sql),
            ["do $$ begin perform 1; end $$;", "begin;", "commit;"]
        );
    }

    #[test]
    fn semicolon_inside_parentheses_does_not_split() {
        assert_eq!(
            stmts("select (1; 2); select 3;"),
            ["select (1; 2);", "select 3;"]
        );
    }

    #[test]
    fn unterminated_constructs_are_errors() {
        for (sql, what) in [
            ("select 'abc", "string literal"),
            ("select \"abc", "quoted identifier"),
            ("select $tag$ abc $tag", "dollar quote $tag$"),
            ("/* a /* b */", "block comment"),
            ("select E'\\'", "escape string literal"),
        ] {
            let err = split(sql).expect_err(sql);
            assert_eq!(err.what, what, "{sql}");
        }
    }

    #[test]
    fn leading_tokens_fold_case_and_keep_quoted_names() {
        let sql = "CREATE INDEX CONCURRENTLY \"Idx\" ON s.t (a);";
        let s = &split(sql).expect("lexes")[0];
        assert_eq!(
            s.leading[..5],
            [
                Token::Word("create".into()),
                Token::Word("index".into()),
                Token::Word("concurrently".into()),
                Token::Quoted("Idx".into()),
                Token::Word("on".into()),
            ]
        );
    }

    #[test]
    fn line_index() {
        let idx = LineIndex::new("a\nb\n\nc");
        assert_eq!(idx.line(0), 1);
        assert_eq!(idx.line(1), 1);
        assert_eq!(idx.line(2), 2);
        assert_eq!(idx.line(5), 4);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Fragments that exercise every lexical rule, glued in random order.
        fn sqlish() -> impl Strategy<Value = String> {
            let frag = prop_oneof![
                Just("select 1".to_string()),
                Just(";".to_string()),
                Just(" ".to_string()),
                Just("\n".to_string()),
                Just("'a;''b'".to_string()),
                Just("E'x\\';'".to_string()),
                Just("\"q;\"\"\"".to_string()),
                Just("$$ ; $$".to_string()),
                Just("$t$ $$ ; $t$".to_string()),
                Just("-- c; $$\n".to_string()),
                Just("/* a /* ; */ b */".to_string()),
                Just("(".to_string()),
                Just(")".to_string()),
                Just("create function f() begin atomic select 1; end".to_string()),
                Just("$1".to_string()),
                "[a-z_$0-9]{1,6}",
                "\\PC{0,4}",
            ];
            prop::collection::vec(frag, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn pieces_rejoin_to_the_original(sql in sqlish()) {
                if let Ok(pieces) = split(&sql) {
                    let joined: String = pieces.iter().map(|p| p.text(&sql)).collect();
                    prop_assert_eq!(joined, sql.clone());
                    let mut at = 0;
                    for p in &pieces {
                        prop_assert_eq!(p.range.start, at);
                        prop_assert!(p.range.end > p.range.start);
                        at = p.range.end;
                    }
                }
            }

            #[test]
            fn arbitrary_text_never_panics_and_rejoins(sql in "\\PC{0,200}") {
                match split(&sql) {
                    Ok(pieces) => {
                        let joined: String = pieces.iter().map(|p| p.text(&sql)).collect();
                        prop_assert_eq!(joined, sql);
                    }
                    Err(e) => prop_assert!(e.offset < sql.len()),
                }
            }

            #[test]
            fn joining_statements_with_semicolons_splits_back(
                parts in prop::collection::vec("[a-z ]{0,5}'[a-z;]{0,5}'[a-z ]{0,5}", 1..8)
            ) {
                let sql = parts.join(";\n");
                let got: Vec<String> = split(&sql)
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.text(&sql).trim_start().trim_end_matches(';').to_string())
                    .collect();
                let want: Vec<String> = parts.iter().map(|p| p.trim_start().to_string()).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
