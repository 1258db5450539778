"""`featurewatch report`: one self-contained HTML file with the drift page's numbers and
charts (plotly.js embedded once), to attach to an incident or send to someone without
access to the platform."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from featurewatch.config import FeaturewatchConfig, format_duration
from featurewatch.dashboard import charts
from featurewatch.dashboard.app import _fmt, _highlight
from featurewatch.dashboard.queries import DashboardData

TRENDS = 5  # the top movers that get a full trend chart and examples


def write_report(
    cfg: FeaturewatchConfig,
    out: Path,
    *,
    sae_version: str | None = None,
    tag: str | None = None,
    window: str = "1h",
    baseline: str = "24h",
    limit: int = 20,
) -> dict:
    """Write the report to `out`; returns the drift result it shows."""
    data = DashboardData(cfg)
    try:
        drift = data.drift(sae_version, tag=tag, window=window, baseline=baseline, limit=limit)
        span = format_duration(drift["end"] - drift["baseline_start"])
        details = []
        for mover in drift["movers"][:TRENDS]:
            f = data.feature(drift["sae_version"], mover["feature_id"], span=span, examples=5)
            title = f"feature {f['feature_id']} {f['label'] or ''}".strip()
            details.append((f, charts.trend_chart(f"trend-{f['feature_id']}", f["trend"], title)))
        timeline = data.timeline(limit=50)
    finally:
        data.close()
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(["html"]),
    )
    env.filters["fmt"] = _fmt
    env.filters["highlight"] = _highlight
    page = env.get_template("report.html").render(
        d=drift,
        made_at=datetime.now(UTC),
        plotly_js=charts.plotly_js().decode(),
        chart=charts.movers_chart("movers-chart", drift["movers"]),
        sparks={
            m["feature_id"]: charts.sparkline(
                f"spark-{m['feature_id']}", m["series"], drift["window_start"]
            )
            for m in drift["movers"]
        },
        details=details,
        t=timeline,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return drift
