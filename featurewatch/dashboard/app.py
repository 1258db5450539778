"""The dashboard: a FastAPI app over one home, run by `featurewatch dashboard` (uvicorn).

A separate small app rather than a Ray Serve deployment: it reads only files in the
home (the catalog's readers' copy, the audit log, heartbeats), so it works whether or
not the Ray cluster is up (an analyst's laptop, a cluster being repaired), and it never
takes CPU from the model replicas. Every page and API call needs a token (auth.py).
"""

from __future__ import annotations

import html
import logging
import math
import re
import threading
import time
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from featurewatch import __version__
from featurewatch.config import FailureLimiter, FeaturewatchConfig
from featurewatch.dashboard import charts
from featurewatch.dashboard.auth import Identity, TokenStore
from featurewatch.dashboard.queries import DashboardData
from featurewatch.errors import FeaturewatchError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import FeatureEdit, apply_feature_edit, submit
from featurewatch.storage.registry import FeatureRegistry, check_tag

COOKIE = "fw_token"
log = logging.getLogger(__name__)
HERE = Path(__file__).parent


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _highlight(context: str | None) -> str:
    """The token context with the firing token (between ⟦ ⟧) in <mark>, escaped."""
    text = html.escape(context or "")
    return re.sub(r"⟦(.*?)⟧", r"<mark>\1</mark>", text)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return "" if value is None else str(value)


def drift_query(
    sae: str | None = None,
    model: str | None = None,
    version: str | None = None,
    tag: str | None = None,
    window: str = "1h",
    baseline: str = "24h",
    limit: int = 20,
    end: str | None = None,
    exact: bool = False,
) -> dict:
    """The drift page's and API's query parameters, as DashboardData.drift's arguments."""
    return {"sae_version": sae, "model": model, "model_version": version, "tag": tag,
            "window": window, "baseline": baseline, "limit": limit, "end": end,
            "exact": exact}  # fmt: skip


def create_app(cfg: FeaturewatchConfig, platform_token: str | None = None) -> FastAPI:
    app = FastAPI(title="featurewatch", docs_url=None, redoc_url=None, openapi_url=None)
    data = DashboardData(cfg)
    tokens = TokenStore(cfg.dashboard_tokens_file, platform_token)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["fmt"] = _fmt
    templates.env.filters["highlight"] = _highlight
    app.state.data = data

    failures = FailureLimiter(max_failures=20, window_s=60.0)

    def identify(request: Request, token: str | None) -> Identity | None:
        """Who holds `token`; a failure is logged and counted against the client's
        address, and an address with too many is refused for a while (429)."""
        client = request.client.host if request.client else "unknown"
        left = failures.locked(client)
        if left is not None:
            raise _Refused(429, f"too many failed logins from {client}: try again in "
                                f"{left:.0f} s")  # fmt: skip
        if not token:
            return None
        who = tokens.identify(token)
        if who is None:
            count = failures.failed(client)
            log.warning("failed dashboard login from %s on %s (%d in 60 s)", client,
                        request.url.path, count)  # fmt: skip
        return who

    def identity(request: Request) -> Identity | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        return identify(request, token or request.cookies.get(COOKIE))

    def quiet_identity(request: Request) -> Identity | None:
        try:
            return identity(request)
        except FeaturewatchError:  # e.g. a broken token file: the page says why
            return None

    @app.middleware("http")
    async def same_origin_posts(request: Request, call_next):
        # The login cookie goes with any request from this host, any port: a POST
        # that a browser marks as coming from another origin is refused.
        if request.method == "POST":
            origin = request.headers.get("origin")
            fetch_site = request.headers.get("sec-fetch-site")
            ours = f"{request.url.scheme}://{request.url.netloc}"
            if (origin and origin != ours) or fetch_site in ("cross-site", "same-site"):
                return JSONResponse({"error": "cross-origin POST refused"}, status_code=403)
        return await call_next(request)

    def viewer(request: Request) -> Identity:
        who = identity(request)
        if who is None:
            raise _Refused(401, "a login token is required")
        return who

    def operator(request: Request) -> Identity:
        who = viewer(request)
        if not who.can_operate:
            raise _Refused(403, f"{who.name} is a {who.role}: this needs the operator role")
        return who

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if exc.status == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return _page(request, "error.html", None, {"message": exc.message}, exc.status)

    @app.exception_handler(FeaturewatchError)
    async def bad_input(request: Request, exc: FeaturewatchError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=400)
        return _page(request, "error.html", quiet_identity(request), {"message": str(exc)}, 400)

    def _page(request, name, who, context, status=200):
        context = {"who": who, "path": request.url.path, "version": __version__, **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    # ---- login

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/"):
        return _page(request, "login.html", None, {"next": next, "message": None})

    @app.post("/login")
    def login(request: Request, token: str = Form(""), next: str = Form("/")):
        who = identify(request, token.strip())
        if who is None:
            context = {"next": next, "message": "unknown token"}
            return _page(request, "login.html", None, context, 401)
        parts = urlsplit(next)
        local = next.startswith("/") and not next.startswith("//") and not parts.netloc
        target = next if local and "\\" not in next else "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict")
        return response

    @app.get("/logout")
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/static/{name}")
    def static(name: str):
        if name == charts.PLOTLY_JS:
            body, kind = charts.plotly_js(), "application/javascript"
        elif name == "dashboard.css":
            body, kind = (HERE / "static" / name).read_bytes(), "text/css"
        else:
            return Response(status_code=404)
        return Response(body, media_type=kind, headers={"Cache-Control": "max-age=3600"})

    # ---- pages

    @app.get("/", response_class=HTMLResponse)
    def fleet(request: Request):
        who = viewer(request)
        return _page(request, "fleet.html", who, {"o": data.overview()})

    @app.get("/drift", response_class=HTMLResponse)
    def drift(request: Request, query: Annotated[dict, Depends(drift_query)]):
        who = viewer(request)
        result = data.drift(**query)
        sparks = {
            m["feature_id"]: charts.sparkline(
                f"spark-{m['feature_id']}", m["series"], result["window_start"]
            )
            for m in result["movers"]
        }
        context = {
            "d": result,
            "choices": data.choices(),
            "sparks": sparks,
            "chart": charts.movers_chart("movers-chart", result["movers"]),
        }
        return _page(request, "drift.html", who, context)

    @app.get("/features/{sae_version}/{feature_id}", response_class=HTMLResponse)
    def feature(request: Request, sae_version: str, feature_id: int, span: str = "24h"):
        who = viewer(request)
        f = data.feature(sae_version, feature_id, span=span)
        title = f"feature {feature_id} firing rate"
        context = {"f": f, "chart": charts.trend_chart("trend-chart", f["trend"], title)}
        return _page(request, "feature.html", who, context)

    @app.post("/features/{sae_version}/{feature_id}")
    def feature_edit_form(
        request: Request,
        sae_version: str,
        feature_id: int,
        label: str = Form(""),
        description: str = Form(""),
        add_tag: str = Form(""),
        remove_tag: str = Form(""),
    ):
        who = operator(request)
        edit = _edit(who, sae_version, feature_id, label, description, add_tag, remove_tag)
        outcome = _apply_edit(edit)
        return RedirectResponse(
            f"/features/{sae_version}/{feature_id}?edit={outcome}", status_code=303
        )

    @app.get("/timeline", response_class=HTMLResponse)
    def timeline(request: Request, all: bool = False):
        who = viewer(request)
        return _page(request, "timeline.html", who, {"t": data.timeline(everything=all)})

    @app.post("/decisions/{decision_id}/approve")
    def approve_form(request: Request, decision_id: str):
        who = operator(request)
        data.approve(decision_id, who.name)
        return RedirectResponse(f"/timeline?approved={decision_id}", status_code=303)

    @app.get("/sql", response_class=HTMLResponse)
    def sql_page(request: Request, q: str = ""):
        who = viewer(request)
        result, error, took = None, None, None
        if q.strip():
            started = time.perf_counter()
            try:
                result = data.sql(q)
            except FeaturewatchError as err:
                error = str(err)
            took = time.perf_counter() - started
        context = {"q": q, "result": result, "error": error, "took": took}
        return _page(request, "sql.html", who, context)

    # ---- JSON API (same checks; Authorization: Bearer <token>)

    @app.get("/api/overview")
    def api_overview(request: Request):
        viewer(request)
        return JSONResponse(_jsonable(data.overview()))

    @app.get("/api/drift")
    def api_drift(request: Request, query: Annotated[dict, Depends(drift_query)]):
        viewer(request)
        result = data.drift(**query)
        return JSONResponse(_jsonable(result))

    @app.get("/api/features/{sae_version}/{feature_id}")
    def api_feature(request: Request, sae_version: str, feature_id: int, span: str = "24h"):
        viewer(request)
        return JSONResponse(_jsonable(data.feature(sae_version, feature_id, span=span)))

    @app.post("/api/features/{sae_version}/{feature_id}")
    async def api_feature_edit(request: Request, sae_version: str, feature_id: int):
        who = operator(request)
        body = await _json_body(request)
        try:
            edit = FeatureEdit.model_validate(
                {**body, "sae_version": sae_version, "feature_id": feature_id, "actor": who.name}
            )
        except ValueError as err:
            raise _Refused(400, f"invalid edit: {err}") from None
        return JSONResponse({"outcome": await run_in_threadpool(_apply_edit, edit)})

    @app.get("/api/timeline")
    def api_timeline(request: Request, all: bool = False):
        viewer(request)
        return JSONResponse(_jsonable(data.timeline(everything=all)))

    @app.post("/api/decisions/{decision_id}/approve")
    def api_approve(request: Request, decision_id: str):
        who = operator(request)
        return JSONResponse(_jsonable(data.approve(decision_id, who.name)))

    @app.post("/api/sql")
    async def api_sql(request: Request):
        viewer(request)
        body = await _json_body(request)
        if not isinstance(body.get("sql"), str):
            raise _Refused(400, "the body must be JSON with a string field 'sql'")
        # Off the event loop: a slow query must not hold up every other page.
        return JSONResponse(_jsonable(await run_in_threadpool(data.sql, body["sql"])))

    edit_lock = threading.Lock()  # one writer connection in this process at a time

    def _apply_edit(edit: FeatureEdit) -> str:
        """Straight into the catalog when no other process writes it; otherwise checked
        against the readers' copy and queued for the writer (the pipeline applies it
        within a round)."""
        with edit_lock:
            try:
                catalog = Catalog(cfg.catalog_path, cfg.lake_location)
            except FeaturewatchError as err:
                if "lock" not in str(err).lower():
                    raise
                for tag in edit.add_tags + edit.remove_tags:
                    check_tag(tag)
                with data.catalog() as readers:
                    FeatureRegistry(readers).check_feature(edit.sae_version, edit.feature_id)
                submit(cfg.inbox_dir, edit)
                return "queued"
            with catalog:
                apply_feature_edit(catalog, edit)
            return "applied"

    return app


def _edit(who, sae_version, feature_id, label, description, add_tag, remove_tag) -> FeatureEdit:
    def tags(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    try:
        return FeatureEdit(
            sae_version=sae_version,
            feature_id=feature_id,
            actor=who.name,
            label=label.strip() or None,
            description=description.strip() or None,
            add_tags=tags(add_tag),
            remove_tags=tags(remove_tag),
        )
    except ValueError as err:
        raise _Refused(400, f"invalid edit: {err}") from None


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise _Refused(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "the body must be a JSON object")
    return body


def _jsonable(value):
    """Query results as JSON: times as ISO text, decimals as numbers, bytes as hex, and
    NaN or infinity (which JSON cannot hold) as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date | clock_time):
        return value.isoformat()
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
