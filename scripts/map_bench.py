"""Time the map page in headless Chromium: time to first draw and frames per second while panning.

    .venv/bin/python scripts/map_bench.py [--sizes 46080,458752] [--plotly PATH ...]

One small synthetic site is rendered, then its map is refilled with synthetic points of each
size (per layer JSON, as `render` writes them) and opened with each renderer:

- ``atlas-scatter``: the map page itself, drawn by assets/atlas-scatter.js (what a site ships);
- ``plotly`` bundles, for comparison, when given or found: the full plotly.min.js of a PyPI
  ``plotly`` package still importable here, and npm's gl2d partial bundle where an older
  scripts/setup installed it; drawn by a minimal page written here (one scattergl trace per
  layer, hover text, pan), the way the map drew before atlas-scatter.js replaced it;
- ``raw-webgl``: a bare ``gl.POINTS`` renderer written here, the floor any renderer sits above.

First draw is navigation start to the first frame after the map says it has drawn (the page sets
``data-points``). Panning is a real mouse drag of 60 steps; fps = animation frames the page
managed during it / its seconds. Prints a Markdown table and the WebGL renderer Chromium used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import CHROMIUM, CHROMIUM_ARGS, served  # noqa: E402  (the browser and server the tests use)

GL2D = Path(sys.prefix) / "share" / "atlas" / "npm" / "node_modules" / "plotly.js-gl2d-dist-min" / "plotly-gl2d.min.js"
N_CLUSTERS = 512

# Set before any page script runs: notes the first frame after #atlas-map gets data-points.
FIRST_DRAW = """
new MutationObserver((_, obs) => {
  const el = document.getElementById("atlas-map");
  if (el && el.hasAttribute("data-points")) {
    obs.disconnect();
    requestAnimationFrame(() => requestAnimationFrame(() => { window.__drawn = performance.now(); }));
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-points"]});
"""

# The floor: the same points JSON drawn as gl.POINTS, panned by a uniform offset.
RAW_PAGE = """<!doctype html><meta charset=utf-8><title>raw webgl</title>
<body style="margin:0"><canvas id=c style="width:100%;height:78vh;display:block"></canvas>
<div id="atlas-map"></div>
<script id="atlas-map-data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("atlas-map-data").textContent);
const canvas = document.getElementById("c"), gl = canvas.getContext("webgl");
canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight;
const vs = `attribute vec2 p; attribute float h; uniform vec4 v; varying float k;
  void main() { gl_Position = vec4((p - v.xy) * v.zw, 0., 1.); gl_PointSize = 3.; k = h; }`;
const fs = `precision mediump float; varying float k;
  void main() { gl_FragColor = vec4(k, 1. - k, .5, .8); }`;
function shader(type, src) { const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); return s; }
const prog = gl.createProgram();
gl.attachShader(prog, shader(gl.VERTEX_SHADER, vs)); gl.attachShader(prog, shader(gl.FRAGMENT_SHADER, fs));
gl.linkProgram(prog); gl.useProgram(prog);
Promise.all(data.layers.map((_, l) => fetch("points/" + l + ".json").then(r => r.json()))).then(parts => {
  const n = parts.reduce((s, p) => s + p.x.length, 0), xy = new Float32Array(2 * n), hue = new Float32Array(n);
  let i = 0;
  for (const p of parts) for (let j = 0; j < p.x.length; j++, i++) {
    xy[2 * i] = p.x[j]; xy[2 * i + 1] = p.y[j]; hue[i] = (p.cluster[j] * 0.618) % 1;
  }
  function buffer(arr, name, size) {
    gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer()); gl.bufferData(gl.ARRAY_BUFFER, arr, gl.STATIC_DRAW);
    const at = gl.getAttribLocation(prog, name); gl.enableVertexAttribArray(at);
    gl.vertexAttribPointer(at, size, gl.FLOAT, false, 0, 0);
  }
  buffer(xy, "p", 2); buffer(hue, "h", 1);
  const view = [0, 0, 0.09, 0.09 * canvas.width / canvas.height];
  const loc = gl.getUniformLocation(prog, "v");
  function draw() { gl.viewport(0, 0, canvas.width, canvas.height); gl.clear(gl.COLOR_BUFFER_BIT);
                    gl.uniform4f(loc, view[0], view[1], view[3], view[2]); gl.drawArrays(gl.POINTS, 0, n); }
  let drag = null;
  canvas.addEventListener("mousedown", e => { drag = [e.clientX, e.clientY]; });
  addEventListener("mouseup", () => { drag = null; });
  addEventListener("mousemove", e => {
    if (!drag) return;
    view[0] -= (e.clientX - drag[0]) / canvas.width * 2 / view[3]; view[1] += (e.clientY - drag[1]) / canvas.height * 2 / view[2];
    drag = [e.clientX, e.clientY]; requestAnimationFrame(draw);
  });
  draw();
  document.getElementById("atlas-map").setAttribute("data-points", String(n));
});
</script>"""


# The comparison: plotly's WebGL scatter over the same points, one trace per layer, as the map was.
PLOTLY_PAGE = """<!doctype html><meta charset=utf-8><title>plotly</title>
<body style="margin:0"><div id="atlas-map" style="width:100%;height:78vh"></div>
<script id="atlas-map-data" type="application/json">__DATA__</script>
<script src="../assets/plotly.min.js"></script>
<script>
const data = JSON.parse(document.getElementById("atlas-map-data").textContent);
Promise.all(data.layers.map((_, l) => fetch("points/" + l + ".json").then(r => r.json()))).then(parts => {
  const traces = parts.map((p, l) => ({type: "scattergl", mode: "markers", hoverinfo: "text",
    x: p.x, y: p.y, text: p.label.map((t, j) => "L" + l + "/N" + j + " " + t),
    marker: {size: 3, color: p.cluster.map(c => (c * 0.618) % 1), colorscale: "Viridis", cmin: 0, cmax: 1}}));
  const el = document.getElementById("atlas-map");
  return Plotly.newPlot(el, traces, {margin: {l: 0, r: 0, t: 0, b: 0}, showlegend: false, dragmode: "pan",
    hovermode: "closest", xaxis: {visible: false}, yaxis: {visible: false, scaleanchor: "x"}},
    {scrollZoom: true, displaylogo: false}).then(() => el.setAttribute("data-points", String(traces.length)));
});
</script>"""

def synthetic_points(n_layers: int, per_layer: int, seed: int = 0) -> list[dict]:
    """Points as `render` writes them: per layer x, y, cluster, label; clusters as blobs on a plane."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (N_CLUSTERS, 2))
    parts = []
    for layer in range(n_layers):
        cluster = rng.integers(0, N_CLUSTERS, per_layer)
        xy = centres[cluster] + rng.normal(0, 0.8, (per_layer, 2))
        parts.append({"x": np.round(xy[:, 0], 3).tolist(), "y": np.round(xy[:, 1], 3).tolist(),
                      "cluster": cluster.tolist(), "label": [f"synthetic topic {c} word {i % 97}"
                                                             for i, c in enumerate(cluster.tolist())]})
    return parts


def refill_map(site: Path, parts: list[dict]) -> None:
    """Replace the rendered map's points and its inline layer sizes and cluster list."""
    points = site / "map" / "points"
    shutil.rmtree(points)
    points.mkdir()
    for layer, p in enumerate(parts):
        (points / f"{layer}.json").write_text(json.dumps(p, separators=(",", ":")), encoding="utf-8")
    data = {"layers": [len(p["x"]) for p in parts],
            "clusters": {"label": [f"topic {c}" for c in range(N_CLUSTERS)],
                         "size": [N_CLUSTERS - c for c in range(N_CLUSTERS)]}}
    page = site / "map" / "index.html"
    html = page.read_text(encoding="utf-8")
    start = html.index('<script id="atlas-map-data" type="application/json">') + len('<script id="atlas-map-data" type="application/json">')
    end = html.index("</script>", start)
    page.write_text(html[:start] + json.dumps(data) + html[end:], encoding="utf-8")
    (site / "map" / "raw.html").write_text(RAW_PAGE.replace("__DATA__", json.dumps(data)), encoding="utf-8")
    (site / "map" / "plotly.html").write_text(PLOTLY_PAGE.replace("__DATA__", json.dumps(data)), encoding="utf-8")


def measure(browser, url: str, pan_target: str) -> tuple[float, float]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.add_init_script(FIRST_DRAW)
    page.goto(url)
    page.wait_for_function("window.__drawn !== undefined", timeout=300_000)
    first = page.evaluate("window.__drawn")
    box = page.locator(pan_target).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.evaluate("""() => { window.__frames = 0;
        (function tick() { window.__frames++; requestAnimationFrame(tick); })(); }""")
    page.mouse.move(x, y)
    page.mouse.down()
    f0, t0 = page.evaluate("[window.__frames, performance.now()]")
    for i in range(60):
        page.mouse.move(x + 4 * (i + 1), y + 2 * (i + 1))
        page.evaluate("new Promise(r => requestAnimationFrame(() => r()))")
    f1, t1 = page.evaluate("[window.__frames, performance.now()]")
    page.mouse.up()
    page.close()
    return first / 1000, (f1 - f0) / ((t1 - t0) / 1000)


def webgl_renderer(browser) -> str:
    page = browser.new_page()
    name = page.evaluate("""() => { const gl = document.createElement("canvas").getContext("webgl");
        if (!gl) return "no WebGL"; const d = gl.getExtension("WEBGL_debug_renderer_info");
        return d ? gl.getParameter(d.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER); }""")
    page.close()
    return name


def plotly_bundles(extra: list[Path]) -> dict[str, Path]:
    """The plotly.js bundles to compare with: PyPI plotly's full bundle if importable, npm's gl2d, any given."""
    found = {}
    try:
        import plotly

        full = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        if full.is_file():
            found[f"plotly.js full (PyPI plotly {plotly.__version__})"] = full
    except ImportError:
        pass
    if GL2D.is_file():
        found["plotly.js gl2d (npm plotly.js-gl2d-dist-min)"] = GL2D
    for path in extra:
        found[f"plotly.js {path.name}"] = path
    return found


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from atlas.bench.synthetic import make_synthetic_store
    from atlas.config import RenderConfig
    from atlas.site.render import render

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="46080,458752", help="neuron counts, comma-separated")
    ap.add_argument("--plotly", type=Path, action="append", default=[], help="a plotly.js bundle to compare with")
    ap.add_argument("--no-plotly", action="store_true", help="measure atlas-scatter and the floor only")
    args = ap.parse_args(argv)
    bundles = {} if args.no_plotly else plotly_bundles(args.plotly)
    if not bundles and not args.no_plotly:
        print("map_bench: no plotly.js bundle here (pip install plotly, or --plotly PATH); measuring without it",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = make_synthetic_store(tmp / "atlas.duckdb", 2, 16, vocab_size=256, clusters=True)
        render(store, tmp / "site", RenderConfig(workers=1), progress=False)
        site = tmp / "site"
        scatter = site / "assets" / "atlas-scatter.js"
        rows = []
        with sync_playwright() as pw, served(site) as base:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            print(f"Chromium {browser.version}, WebGL renderer: {webgl_renderer(browser)}")
            for size in (int(s) for s in args.sizes.split(",")):
                n_layers = 30 if size <= 46_080 else 32
                refill_map(site, synthetic_points(n_layers, size // n_layers))
                runs = [("atlas-scatter", scatter.stat().st_size, "map/", "#atlas-map")]
                for name, bundle in bundles.items():
                    shutil.copyfile(bundle, site / "assets" / "plotly.min.js")
                    runs.append((name, bundle.stat().st_size, "map/plotly.html", "#atlas-map"))
                runs.append(("raw-webgl", 0, "map/raw.html", "#c"))
                for name, nbytes, url, target in runs:
                    t = time.perf_counter()
                    first, fps = measure(browser, base + url, target)
                    rows.append((name, nbytes, size, first, fps))
                    print(f"  {name} {size:,}: {first:.2f} s, {fps:.1f} fps ({time.perf_counter() - t:.0f} s)", flush=True)
            browser.close()
    print("\n| renderer | script bytes | points | first draw (s) | pan fps |\n|---|---:|---:|---:|---:|")
    for name, nbytes, size, first, fps in rows:
        print(f"| {name} | {nbytes:,} | {size:,} | {first:.2f} | {fps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
