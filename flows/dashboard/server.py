"""The interactive dashboard: a FastAPI app over one run folder, served on 127.0.0.1 by uvicorn.

``/`` is the dashboard page; the query parameter ``dataset`` filters every chart and the thumbnails,
``step``, ``reason`` and ``page`` choose the page of thumbnails. ``/thumbnails`` is that section alone
(the page's filters and pager fetch it), ``/api/thumbnails`` the same page as JSON, ``/api/funnel`` the
funnel, ``/thumbnail/<step>/<key>.jpg`` one image and ``/plotly.min.js`` the plotly.js of the installed
plotly package (no CDN). Every request reads the run folder as it is then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

from flows.dashboard.data import RunData
from flows.dashboard.page import (
    THUMBNAILS_SCRIPT,
    closing_sections,
    dataset_form,
    document,
    served_thumbnails,
    summary_sections,
)
from infu.paths import package_file

PAGE_SIZE = 24
MAX_PAGE_SIZE = 200
PLOTLY_JS = "/plotly.min.js"

Text = Annotated[str | None, Query()]
"""An optional filter; empty (a form's "every ..." choice) means none."""
Page = Annotated[int, Query(ge=1)]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


def create_app(run_dir: Path) -> FastAPI:
    """The dashboard app of ``run_dir``."""
    data = RunData(Path(run_dir))
    app = FastAPI(title="InfU dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def image_step(step: str | None) -> str | None:
        """The requested step (it must store images), else the filter, else the first that does."""
        steps = data.image_steps()
        if step and step not in steps:
            raise HTTPException(404, f"step {step!r} stores no images in this run; these do: {steps}")
        return step or ("filter" if "filter" in steps else next(iter(steps), None))

    def thumbnails_section(
        step: str | None, reason: str | None, dataset: str | None, page: int, page_size: int
    ) -> str:
        current = {"dataset": dataset, "step": step, "reason": reason, "page": page, "page_size": page_size}

        def link(**changes: Any) -> str:
            query = {name: value for name, value in {**current, **changes}.items() if value is not None}
            return f"/?{urlencode(query)}#thumbnails"

        return served_thumbnails(data, step, reason, dataset, page, page_size, link)

    @app.get("/", response_class=HTMLResponse)
    def dashboard(
        dataset: Text = None,
        step: Text = None,
        reason: Text = None,
        page: Page = 1,
        page_size: PageSize = PAGE_SIZE,
    ) -> str:
        dataset, reason, step = dataset or None, reason or None, image_step(step)
        body = [
            *summary_sections(data, dataset),
            thumbnails_section(step, reason, dataset, page, page_size),
            *closing_sections(data),
        ]
        head = f'<script src="{PLOTLY_JS}"></script><script>{THUMBNAILS_SCRIPT}</script>'
        return document(data.run_dir, head, body, dataset_form(data, step, reason, dataset))

    @app.get("/thumbnails", response_class=HTMLResponse)
    def thumbnails_fragment(
        dataset: Text = None,
        step: Text = None,
        reason: Text = None,
        page: Page = 1,
        page_size: PageSize = PAGE_SIZE,
    ) -> str:
        return thumbnails_section(image_step(step), reason or None, dataset or None, page, page_size)

    @app.get("/api/thumbnails")
    def thumbnails(
        step: Text = None,
        reason: Text = None,
        dataset: Text = None,
        page: Page = 1,
        page_size: PageSize = PAGE_SIZE,
    ) -> dict[str, Any]:
        step = image_step(step)
        if step is None:
            return {"step": None, "total": 0, "page": page, "pages": 1, "items": []}
        found = data.thumbnails(step, reason or None, dataset or None, (page - 1) * page_size, page_size)
        return {
            "step": step,
            "total": found.total,
            "page": page,
            "pages": max(1, -(-found.total // page_size)),
            "items": [
                {
                    "key": item.key,
                    "dataset": item.dataset,
                    "outcome": item.outcome,
                    "detail": item.detail,
                    "image": f"/thumbnail/{step}/{item.key}.jpg" if data.image_member(item) else None,
                }
                for item in found.items
            ],
        }

    @app.get("/api/funnel")
    def funnel(dataset: Text = None) -> dict[str, dict[str, int]]:
        return data.funnel(dataset or None)

    @app.get("/thumbnail/{step}/{key}.jpg")
    def thumbnail(step: str, key: str) -> Response:
        item = data.thumbnail(step, key) if step in data.image_steps() else None
        jpeg = data.thumbnail_jpeg(item) if item is not None else None
        if jpeg is None:
            raise HTTPException(404, f"no stored image of {key} in {step}")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get(PLOTLY_JS)
    def plotly_js() -> FileResponse:
        return FileResponse(
            package_file("plotly", "package_data", "plotly.min.js"), media_type="text/javascript"
        )

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    return app


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the dashboard of ``run_dir`` until interrupted (on the loopback interface by default)."""
    uvicorn.run(create_app(run_dir), host=host, port=port, log_level="info")
