//! The test database, addressed the way a child process needs it.

/// The URL of the database `pool` belongs to (the one `#[sqlx::test]` created),
/// on the server in `DATABASE_URL`.
pub fn db_url(pool: &sqlx::PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(
        pool.connect_options()
            .get_database()
            .expect("sqlx::test names its database"),
    );
    url.to_string()
}
