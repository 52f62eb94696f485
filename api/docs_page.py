"""The browsable API reference at /schema (and /schema/swagger): Swagger UI, served offline.

Litestar's own pages load their JavaScript and CSS from public CDNs, so they are blank on a box
without internet. This page loads Swagger UI from the files of the `swagger-ui-py` package
(pinned in pyproject.toml), served by this service under /schema/assets/, and the document from
/schema/openapi.json: nothing from another host. It is the only page OpenAPIConfig renders.
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path
from typing import Any

from litestar import Request, Router, get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.params import FromPath
from litestar.response import File

ASSETS_PACKAGE = "swagger_ui"  # PyPI: swagger-ui-py (Swagger UI 5, which reads OpenAPI 3.1)
ASSETS_PATH = "/assets"  # under the OpenAPI path: /schema/assets/<name>
ASSET_MEDIA_TYPES = {
    "swagger-ui.css": "text/css",  # Litestar adds "; charset=utf-8" to text types
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
ASSET_MAX_AGE_S = 24 * 3600


def assets_dir() -> Path | None:
    """Where the package keeps Swagger UI's files (found without importing the package)."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@get(f"{ASSETS_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False,
     cache_control=None)
def asset(name: FromPath[str]) -> File:
    """One of Swagger UI's files, by name (only those the page uses)."""
    folder = assets_dir()
    media_type = ASSET_MEDIA_TYPES.get(name)
    if media_type is None or folder is None or not (folder / name).is_file():
        raise NotFoundException(f"no asset {name[:64]!r}" if folder is not None else
                                f"the docs page's assets are not installed (package {ASSETS_PACKAGE})")
    return File(folder / name, media_type=media_type, content_disposition_type="inline",
                headers={"Cache-Control": f"public, max-age={ASSET_MAX_AGE_S}"})


class OfflineSwaggerPage(OpenAPIRenderPlugin):
    """Swagger UI from this service's own assets; "Authorize" takes an admin token or API key."""

    def __init__(self) -> None:
        super().__init__(path=["/swagger", "/"])

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        document = self.get_openapi_json_route(request)  # /schema/openapi.json
        assets = f"{document.rsplit('/', 1)[0]}{ASSETS_PATH}"
        title = html.escape(str(openapi_schema.get("info", {}).get("title", "API")))
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "{document}",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
}});
</script>
</body>
</html>
""".encode()

    def receive_router(self, router: Router) -> None:
        router.register(asset)
