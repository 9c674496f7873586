//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 description of the API, built with utoipa from
//! one table of routes ([`ROUTES`]). A test checks that every route in it is served, so the
//! description and the router cannot drift apart silently.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathItem,
    PathsBuilder, Ref, Required, ResponseBuilder,
};

/// What a route takes as its body.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body {
    None,
    /// A JSON object (or, where said, an array), with these fields.
    Json(&'static str),
    /// Raw bytes (a file).
    Bytes,
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    pub(crate) method: &'static str,
    pub(crate) path: &'static str,
    pub(crate) tag: &'static str,
    pub(crate) summary: &'static str,
    pub(crate) body: Body,
    /// Query parameters: name, description.
    pub(crate) query: &'static [(&'static str, &'static str)],
    /// Status and content type of a success.
    pub(crate) ok: (u16, &'static str),
}

const JSON: &str = "application/json";

const TASK_OP: &str = "one of start, update, step, complete, fail, pause, resume, cancel, retry; \
    body fields as in `progress apply`: message, percentage, details, step_name, completed_steps, \
    error_message";

/// Every route of the API.
pub(crate) const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/healthz",
        tag: "meta",
        summary: "Liveness (no token needed)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/metrics",
        tag: "meta",
        summary: "Metrics in the OpenMetrics text format",
        body: Body::None,
        query: &[],
        ok: (200, "application/openmetrics-text"),
    },
    Route {
        method: "get",
        path: "/api/v1/openapi.json",
        tag: "meta",
        summary: "This document",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades",
        tag: "progress",
        summary: "Summaries of the upgrades, oldest first, a page at a time (X-Next-Cursor)",
        body: Body::None,
        query: &[
            ("limit", "most upgrades [10000, the maximum: 400 above]"),
            ("cursor", "the X-Next-Cursor of the previous page"),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/upgrades",
        tag: "progress",
        summary: "Create an upgrade",
        body: Body::Json("upgrade_id, plan_id, cluster_name, metadata (object)"),
        query: &[],
        ok: (201, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}",
        tag: "progress",
        summary: "An upgrade's summary (the reference get_progress_summary keys: overall_percentage, active_tasks, active_task_names, failed_task_names, current_task, ...) and its first 10000 tasks (tasks_next_cursor when more)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/upgrades/{upgrade}/{op}",
        tag: "progress",
        summary: "Upgrade operation: op is start (phase), phase (phase), complete or fail (error_message)",
        body: Body::Json("phase | error_message, as the operation needs (may be empty)"),
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/tasks",
        tag: "progress",
        summary: "An upgrade's tasks in the order they were added, a page at a time (X-Next-Cursor)",
        body: Body::None,
        query: &[
            ("limit", "most tasks [10000, the maximum: 400 above]"),
            ("cursor", "the X-Next-Cursor of the previous page"),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/upgrades/{upgrade}/tasks",
        tag: "progress",
        summary: "Add one task (an object) or many (an array)",
        body: Body::Json(
            "task_id, name, task_type, parent_task_id, total_steps, weight, metadata; or an array of them",
        ),
        query: &[],
        ok: (201, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/tasks/{task}",
        tag: "progress",
        summary: "A task with its recent events (the reference get_task_progress keys: task_name, percentage, recent_events, ...)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/tasks/{task}/events",
        tag: "progress",
        summary: "A task's events, newest first (its retry history with kind=task.failed,task.retried)",
        body: Body::None,
        query: &[
            (
                "kind",
                "only these kinds, comma-separated wire names (task.failed, ...)",
            ),
            ("limit", "at most this many [1000, at most 10000]"),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/upgrades/{upgrade}/tasks/{task}/{op}",
        tag: "progress",
        summary: "Task operation: answers the task, the seq and the events it committed",
        body: Body::Json(TASK_OP),
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/events",
        tag: "progress",
        summary: "Events after a seq, oldest first",
        body: Body::None,
        query: &[
            ("since", "seq to start after [0]"),
            (
                "limit",
                "most events [1000; above 10000 is a 400: page with since]",
            ),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/events/stream",
        tag: "streams",
        summary: "SSE of the upgrade's events (id: seq; Last-Event-ID resumes)",
        body: Body::None,
        query: &[("since", "seq to start after (or the Last-Event-ID header)")],
        ok: (200, "text/event-stream"),
    },
    Route {
        method: "get",
        path: "/api/v1/events/stream",
        tag: "streams",
        summary: "SSE of every upgrade's events",
        body: Body::None,
        query: &[("since", "seq to start after (or the Last-Event-ID header)")],
        ok: (200, "text/event-stream"),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/ws",
        tag: "streams",
        summary: "WebSocket of the upgrade: progress_summary, progress_event, heartbeat, resync, pong",
        body: Body::None,
        query: &[
            ("since", "replay events after this seq first"),
            ("access_token", "the token, where headers cannot be set"),
        ],
        ok: (101, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/ws",
        tag: "streams",
        summary: "WebSocket of every upgrade",
        body: Body::None,
        query: &[
            ("since", "replay events after this seq first"),
            ("access_token", "the token, where headers cannot be set"),
        ],
        ok: (101, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/sessions",
        tag: "artifacts",
        summary: "Test sessions",
        body: Body::None,
        query: &[("upgrade_id", "only this upgrade's")],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/sessions",
        tag: "artifacts",
        summary: "Create a test session",
        body: Body::Json("upgrade_id, cluster_name, name, description, retention_days"),
        query: &[],
        ok: (201, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/ids/{kind}",
        tag: "artifacts",
        summary: "The shortest unambiguous form of each of up to 100 session, collection or artifact ids, in order, as tables show them",
        body: Body::None,
        query: &[("shortest", "comma-separated full ids (at most 100)")],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/ids/{kind}/{abbrev}",
        tag: "artifacts",
        summary: "The full session, collection or artifact id an abbreviation names (a unique prefix, or a unique suffix of 6+ characters); ambiguous ones list the candidates",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/tests/ingest",
        tag: "tests",
        summary: "Record a test run from one JUnit XML report (the raw body, at most the \
            server's --max-ingest-bytes, else 413); kept as a test_result artifact in the \
            upgrade's validation collection when artifacts are on",
        body: Body::Bytes,
        query: &[
            (
                "upgrade",
                "the upgrade (required; its cluster is the run's)",
            ),
            ("phase", "pre, post or adhoc (required)"),
            ("cluster", "the run's cluster [the upgrade's]"),
            (
                "session",
                "session keeping the file [the upgrade's latest, created when missing]",
            ),
            (
                "collection",
                "collection keeping the file, with session [the session's validation collection]",
            ),
            ("suite", "suite name for every test [each <testsuite name>]"),
            (
                "framework",
                "framework, part of each test's identity [detected]",
            ),
            ("name", "the report's file name [junit.xml]"),
        ],
        ok: (201, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/runs",
        tag: "tests",
        summary: "Test runs, newest first",
        body: Body::None,
        query: &[
            ("upgrade", "only this upgrade's"),
            ("cluster", "only this cluster's"),
            ("phase", "only pre, post or adhoc runs"),
            ("limit", "most runs [100, at most 10000]"),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/runs/{run}",
        tag: "tests",
        summary: "A run (a 4+ character prefix works) and its failures with their messages",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/runs/{run}/results",
        tag: "tests",
        summary: "A run's results, sorted by suite, class name and name",
        body: Body::None,
        query: &[("failing", "true: only failed and error results")],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/compare",
        tag: "tests",
        summary: "Run a against run b: new_failures, new_errors, still_failing, fixed, \
            newly_skipped, added, missing, flaky, duration_regressions and the gate",
        body: Body::None,
        query: &[("a", "the first (pre) run"), ("b", "the second (post) run")],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/upgrades/{upgrade}/tests/compare",
        tag: "tests",
        summary: "The upgrade's latest pre run against its latest post run (see \
            /api/v1/tests/compare)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/history",
        tag: "tests",
        summary: "Every result of the tests with this name (or test id), newest first",
        body: Body::None,
        query: &[
            ("name", "test name or test id (required)"),
            ("cluster", "only this cluster's"),
            ("limit", "most results [100, at most 10000]"),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/tests/flaky",
        tag: "tests",
        summary: "Tests that passed and failed on a cluster within the window, not cleared by \
            5 passes in a row",
        body: Body::None,
        query: &[("cluster", "only this cluster's"), ("days", "window [14]")],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/sessions/{session}",
        tag: "artifacts",
        summary: "A session with its summary and collections",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/sessions/{session}/complete",
        tag: "artifacts",
        summary: "Complete a session (writes the S3 manifest when S3 is configured)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/sessions/{session}/collections",
        tag: "artifacts",
        summary: "A session's collections",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/sessions/{session}/collections",
        tag: "artifacts",
        summary: "Create a collection",
        body: Body::Json("name, description, task_id"),
        query: &[],
        ok: (201, JSON),
    },
    Route {
        method: "post",
        path: "/api/v1/sessions/{session}/collections/{collection}/artifacts",
        tag: "artifacts",
        summary: "Upload a file (the raw body, streamed)",
        body: Body::Bytes,
        query: &[
            ("name", "file name (required)"),
            ("type", "artifact type [log_file]"),
            ("tag", "a tag (repeatable)"),
            ("task_id", "task"),
            ("step_id", "step"),
            ("description", "description"),
            ("metadata", "a JSON object"),
            (
                "phase",
                "pre, post or adhoc, with type=test_result: a JUnit XML body is also recorded \
                 as a test run of the session's upgrade (answered as test_run)",
            ),
        ],
        ok: (201, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/artifacts",
        tag: "artifacts",
        summary: "Search artifacts, newest first (the CLI's search filters)",
        body: Body::None,
        query: &[
            ("session", "session id"),
            ("collection", "collection id"),
            ("upgrade", "upgrade id"),
            ("type", "artifact type"),
            ("tag", "tag; repeat for all of several"),
            ("task_id", "task id"),
            ("status", "created, uploaded, archived, deleted or failed"),
            ("name", "substring of the name, or a glob with * or ?"),
            ("min_size", "e.g. 1024, 10KiB"),
            ("max_size", "e.g. 5MB"),
            ("since", "added within, e.g. 30m, 6h, 2d"),
            ("limit", "most results per page [100, at most 10000]"),
            (
                "cursor",
                "the X-Next-Cursor header of the previous page; that header is absent on the last page",
            ),
        ],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/artifacts/stats",
        tag: "artifacts",
        summary: "Counts and bytes by type and status",
        body: Body::None,
        query: &[("session", "only this session")],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/artifacts/{artifact}",
        tag: "artifacts",
        summary: "An artifact's record",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "delete",
        path: "/api/v1/artifacts/{artifact}",
        tag: "artifacts",
        summary: "Delete an artifact (and its S3 object)",
        body: Body::None,
        query: &[],
        ok: (200, JSON),
    },
    Route {
        method: "get",
        path: "/api/v1/artifacts/{artifact}/content",
        tag: "artifacts",
        summary: "The verified bytes (ETag = SHA-256; If-None-Match; single Range)",
        body: Body::None,
        query: &[],
        ok: (200, "application/octet-stream"),
    },
];

fn method(m: &str) -> HttpMethod {
    match m {
        "get" => HttpMethod::Get,
        "post" => HttpMethod::Post,
        "delete" => HttpMethod::Delete,
        other => unreachable!("method {other} is not in the table"),
    }
}

/// The document.
pub(crate) fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new()
            .tag(r.tag)
            .summary(Some(r.summary))
            .operation_id(Some(format!("{} {}", r.method, r.path)));
        for seg in r.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                op = op.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
                );
            }
        }
        for (name, desc) in r.query {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(*desc))
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        match r.body {
            Body::None => {}
            Body::Json(fields) => {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .description(Some(format!("JSON with the model's field names: {fields}")))
                        .content(
                            JSON,
                            ContentBuilder::new()
                                .schema(Some(ObjectBuilder::new()))
                                .build(),
                        )
                        .build(),
                ));
            }
            Body::Bytes => {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .description(Some("the file's bytes, streamed"))
                        .required(Some(Required::True))
                        .content(
                            "application/octet-stream",
                            ContentBuilder::new()
                                .schema(Some(
                                    ObjectBuilder::new().schema_type(Type::String).format(Some(
                                        utoipa::openapi::SchemaFormat::KnownFormat(
                                            utoipa::openapi::KnownFormat::Binary,
                                        ),
                                    )),
                                ))
                                .build(),
                        )
                        .build(),
                ));
            }
        }
        let (status, content_type) = r.ok;
        op = op.response(
            status.to_string(),
            ResponseBuilder::new()
                .description("success")
                .content(content_type, ContentBuilder::new().build())
                .build(),
        );
        let error = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Error")))
            .build();
        op = op.response(
            "default",
            ResponseBuilder::new()
                .description("400 malformed, 401 no or wrong token, 403 read token on a write route, or a Host or Origin the server does not answer to, 404 unknown, 405 method not allowed, 409 conflict or invalid transition, 413 too large, 415 a JSON body without Content-Type: application/json, 422 invalid values")
                .content(JSON, error)
                .build(),
        );
        if r.path != "/healthz" {
            op = op.security(SecurityRequirement::new::<_, [&str; 0], &str>("bearer", []));
        }
        paths = paths.path(r.path, PathItem::new(method(r.method), op));
    }
    let error_schema = ObjectBuilder::new()
        .property(
            "error",
            ObjectBuilder::new()
                .property("code", ObjectBuilder::new().schema_type(Type::String))
                .property("message", ObjectBuilder::new().schema_type(Type::String))
                .required("code")
                .required("message"),
        )
        .required("error");
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("EKS Upgrade Agent API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Progress tracking, test artifacts and live streams of the EKS Upgrade Agent. \
                     Bearer tokens with roles read (GET) and write (everything else).",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .schema("Error", error_schema)
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                )
                .build(),
        ))
        .build()
}

/// `GET /api/v1/openapi.json`
pub(crate) async fn openapi() -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::Json(document()).into_response()
}
