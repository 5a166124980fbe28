// A small point renderer for the map: every point one gl.POINTS vertex (WebGL 1), or squares
// on a 2D canvas where WebGL is missing. Names, the hover tip and the highlight ring are DOM
// elements over the canvas, written as text (textContent), never as markup. Hover and tap pick
// through a grid index, so a mouse move looks at a few cells of points, not at all of them.
//
//   var s = AtlasScatter(container, {tip: function (i) { return ["line", ...]; }, open: function (i) {}});
//   s.setPoints(x, y, group); s.setColours(rgb); s.showGroup(g); s.setNames([{x, y, text}]) (first first: later names that overlap it are hidden);
//   s.highlight(i); s.centre(x, y, half); s.fit(); s.pick(cx, cy); s.project(i); s.view(); s.colour(i)
//
// x, y: Float32Array of data coordinates (NaN: not drawn); group: per point a small integer
// (the layer), so a filter is one uniform; rgb: Uint8Array, 3 bytes a point.
(function () {
  "use strict";
  var VS = [
    "attribute vec2 a_xy; attribute vec3 a_rgb; attribute float a_group;",
    "uniform vec4 u_view; uniform float u_size; uniform float u_group; varying vec3 v_rgb; varying float v_size;",
    "void main() {",
    "  bool hidden = u_group >= 0.0 && abs(a_group - u_group) > 0.5;",
    "  gl_Position = hidden ? vec4(2.0, 2.0, 2.0, 1.0) : vec4((a_xy - u_view.xy) * u_view.zw, 0.0, 1.0);",
    "  gl_PointSize = hidden ? 0.0 : u_size; v_rgb = a_rgb; v_size = u_size;",
    "}"].join("\n");
  // Round points with a one-pixel soft edge; inside, the colour is opaque, so its contrast
  // against the page holds (the palette in atlas-map.js is chosen for it).
  var FS = [
    "precision mediump float; varying vec3 v_rgb; varying float v_size;",
    "void main() {",
    "  float r = length(gl_PointCoord - 0.5) * v_size, e = 0.5 * v_size;",
    "  if (r > e) discard;",
    "  gl_FragColor = vec4(v_rgb, 1.0) * clamp(e - r + 0.5, 0.0, 1.0);",
    "}"].join("\n");
  var MAX_ZOOM = 4096, MIN_ZOOM = 0.25;       // relative to the view that fits every point

  function glContext(canvas) {
    try {
      var opts = { alpha: true, premultipliedAlpha: true, antialias: false, depth: false };
      return canvas.getContext("webgl", opts) || canvas.getContext("experimental-webgl", opts);
    } catch (e) { return null; }
  }

  function program(gl) {
    function shader(type, src) {
      var s = gl.createShader(type);
      gl.shaderSource(s, src);
      gl.compileShader(s);
      if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error("WebGL shader: " + gl.getShaderInfoLog(s));
      return s;
    }
    var p = gl.createProgram();
    gl.attachShader(p, shader(gl.VERTEX_SHADER, VS));
    gl.attachShader(p, shader(gl.FRAGMENT_SHADER, FS));
    gl.linkProgram(p);
    if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error("WebGL program: " + gl.getProgramInfoLog(p));
    return p;
  }

  window.AtlasScatter = function (container, opts) {
    opts = opts || {};
    var doc = container.ownerDocument;
    function div(cls) { var d = doc.createElement("div"); d.className = cls; container.appendChild(d); return d; }
    var canvas = doc.createElement("canvas");
    canvas.className = "atlas-scatter-canvas";
    container.appendChild(canvas);
    var namesLayer = div("atlas-scatter-names"), ring = div("atlas-scatter-ring"), tipBox = div("atlas-scatter-tip");
    ring.hidden = true;
    tipBox.hidden = true;
    tipBox.setAttribute("role", "tooltip");

    var gl = glContext(canvas), ctx = null, prog, loc = {};
    try {
      if (gl) prog = program(gl);
    } catch (e) {
      if (window.console) console.warn(e.message);
      gl = null;               // a context that cannot compile these shaders: draw in 2D on a new canvas
      var fresh = canvas.cloneNode(false);
      container.replaceChild(fresh, canvas);
      canvas = fresh;
    }
    if (gl) {
      gl.useProgram(prog);
      ["a_xy", "a_rgb", "a_group"].forEach(function (a) { loc[a] = gl.getAttribLocation(prog, a); });
      ["u_view", "u_size", "u_group"].forEach(function (u) { loc[u] = gl.getUniformLocation(prog, u); });
      gl.enable(gl.BLEND);
      gl.blendFunc(gl.ONE, gl.ONE_MINUS_SRC_ALPHA);
    } else {
      ctx = canvas.getContext("2d");
    }

    var n = 0, X = new Float32Array(0), Y = X, G = X, RGB = new Uint8Array(0), group = -1;
    var box = [0, 1, 0, 1], grid = null, byColour = [];
    var view = { cx: 0, cy: 0, k: 1 }, fitK = 1, w = 1, h = 1, dpr = 1, base = 3;
    var names = [], nameEls = [], marked = -1, tipFor = -1, frame = 0;

    function size() { return base * Math.min(4, Math.max(1, Math.sqrt(view.k / fitK))); }

    // Points of each grid cell, contiguous: cell c holds items[start[c] .. start[c + 1]).
    function buildGrid() {
      var side = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(n / 4))));
      var sx = side / ((box[1] - box[0]) || 1), sy = side / ((box[3] - box[2]) || 1);
      var cell = new Int32Array(n), start = new Uint32Array(side * side + 1), items = new Uint32Array(n);
      for (var i = 0; i < n; i++) {
        if (X[i] !== X[i] || Y[i] !== Y[i]) { cell[i] = -1; continue; }
        var c = Math.min(side - 1, Math.floor((X[i] - box[0]) * sx)) * side + Math.min(side - 1, Math.floor((Y[i] - box[2]) * sy));
        cell[i] = c;
        start[c + 1]++;
      }
      for (var c2 = 0; c2 < side * side; c2++) start[c2 + 1] += start[c2];
      var fill = start.slice(0, side * side);
      for (var j = 0; j < n; j++) if (cell[j] >= 0) items[fill[cell[j]]++] = j;
      grid = { side: side, sx: sx, sy: sy, start: start, items: items };
    }

    function buffer(name, data, size, type, normalise) {
      var b = gl.createBuffer();
      gl.bindBuffer(gl.ARRAY_BUFFER, b);
      gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
      gl.enableVertexAttribArray(loc[name]);
      gl.vertexAttribPointer(loc[name], size, type, normalise, 0, 0);
      return b;
    }
    var rgbBuffer = null;

    function resize() {
      var r = container.getBoundingClientRect();
      w = Math.max(1, r.width);
      h = Math.max(1, r.height);
      dpr = window.devicePixelRatio || 1;
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }

    function draw() {
      frame = 0;
      var s = size();
      if (gl) {
        gl.viewport(0, 0, canvas.width, canvas.height);
        gl.clearColor(0, 0, 0, 0);
        gl.clear(gl.COLOR_BUFFER_BIT);
        if (n) {
          gl.uniform4f(loc.u_view, view.cx, view.cy, 2 * view.k / w, 2 * view.k / h);
          gl.uniform1f(loc.u_size, s * dpr);
          gl.uniform1f(loc.u_group, group);
          gl.drawArrays(gl.POINTS, 0, n);
        }
      } else {
        ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
        ctx.clearRect(0, 0, w, h);
        var half = s / 2, ox = w / 2 - view.cx * view.k, oy = h / 2 + view.cy * view.k;
        byColour.forEach(function (g) {
          ctx.fillStyle = g.style;
          for (var a = 0; a < g.items.length; a++) {
            var i = g.items[a];
            if (group >= 0 && G[i] !== group) continue;
            var px = ox + X[i] * view.k, py = oy - Y[i] * view.k;
            if (px > -half && px < w + half && py > -half && py < h + half) ctx.fillRect(px - half, py - half, s, s);
          }
        });
      }
      place();
    }

    // DOM over the canvas follows the view: names at their points, the ring at its neuron.
    // Names go down the list in its order, each shown only where it overlaps none shown
    // before it: zooming in makes room for more.
    function place() {
      var shown = [];
      nameEls.forEach(function (el, a) {
        var px = w / 2 + (names[a].x - view.cx) * view.k, py = h / 2 - (names[a].y - view.cy) * view.k;
        var inside = px >= 0 && px <= w && py >= 0 && py <= h;
        // Centred on its point, but kept inside the plot's edges (sizes measured once).
        var half = Math.min(names[a].width / 2, w / 2), rise = names[a].height / 2;
        px = Math.max(half, Math.min(w - half, px));
        var box = [px - half, py - rise, px + half, py + rise];
        var free = inside && shown.every(function (b) {
          return box[2] <= b[0] || box[0] >= b[2] || box[3] <= b[1] || box[1] >= b[3];
        });
        el.hidden = !free;
        if (free) shown.push(box);
        el.style.transform = "translate(" + px.toFixed(1) + "px," + py.toFixed(1) + "px) translate(-50%,-50%)";
      });
      if (marked >= 0 && !(group >= 0 && G[marked] !== group)) {
        var rx = w / 2 + (X[marked] - view.cx) * view.k, ry = h / 2 - (Y[marked] - view.cy) * view.k;
        ring.hidden = false;
        ring.style.transform = "translate(" + rx.toFixed(1) + "px," + ry.toFixed(1) + "px) translate(-50%,-50%)";
      } else {
        ring.hidden = true;
      }
    }

    function redraw() { if (!frame) frame = window.requestAnimationFrame(draw); }

    function project(i) {
      var r = canvas.getBoundingClientRect();
      return [r.left + w / 2 + (X[i] - view.cx) * view.k, r.top + h / 2 - (Y[i] - view.cy) * view.k];
    }

    // The visible point under (clientX, clientY) within `slack` px of its edge, nearest first;
    // on a tie the later point, which is drawn on top. -1 when there is none.
    function pick(clientX, clientY, slack) {
      if (!grid || !n) return -1;
      var r = canvas.getBoundingClientRect();
      var x = view.cx + (clientX - r.left - w / 2) / view.k, y = view.cy - (clientY - r.top - h / 2) / view.k;
      var reach = (size() / 2 + (slack == null ? 3 : slack)) / view.k, best = -1, bestD = reach * reach;
      var side = grid.side, clampCell = function (v) { return Math.max(0, Math.min(side - 1, Math.floor(v))); };
      var c0 = clampCell((x - reach - box[0]) * grid.sx), c1 = clampCell((x + reach - box[0]) * grid.sx);
      var r0 = clampCell((y - reach - box[2]) * grid.sy), r1 = clampCell((y + reach - box[2]) * grid.sy);
      for (var c = c0; c <= c1; c++) {
        for (var rr = r0; rr <= r1; rr++) {
          var cell = c * side + rr;
          for (var a = grid.start[cell]; a < grid.start[cell + 1]; a++) {
            var i = grid.items[a];
            if (group >= 0 && G[i] !== group) continue;
            var dx = X[i] - x, dy = Y[i] - y, d = dx * dx + dy * dy;
            if (d < bestD || (d === bestD && i > best)) { best = i; bestD = d; }
          }
        }
      }
      return best;
    }

    function showTip(i) {
      tipFor = i;
      if (i < 0 || !opts.tip) { tipBox.hidden = true; return; }
      tipBox.textContent = "";
      opts.tip(i).forEach(function (line) {
        var d = doc.createElement("div");
        d.textContent = line;
        tipBox.appendChild(d);
      });
      tipBox.hidden = false;
      var r = canvas.getBoundingClientRect(), p = project(i), px = p[0] - r.left, py = p[1] - r.top;
      // Beside the point, flipped to the other side near the right or bottom edge.
      var tw = tipBox.offsetWidth, th = tipBox.offsetHeight;
      tipBox.style.left = Math.max(0, px + 12 + tw > w ? px - 12 - tw : px + 12) + "px";
      tipBox.style.top = Math.max(0, py + 12 + th > h ? py - 12 - th : py + 12) + "px";
    }

    function zoomAt(px, py, factor) {
      var k = Math.max(fitK * MIN_ZOOM, Math.min(fitK * MAX_ZOOM, view.k * factor));
      // Keep the data point under (px, py) in place.
      var x = view.cx + (px - w / 2) / view.k, y = view.cy - (py - h / 2) / view.k;
      view.cx = x - (px - w / 2) / k;
      view.cy = y + (py - h / 2) / k;
      view.k = k;
      redraw();
    }
    function panBy(dx, dy) { view.cx -= dx / view.k; view.cy += dy / view.k; redraw(); }

    // Pointer input: one pointer pans (and taps), two pinch; mouse, pen and touch alike.
    var pointers = new Map(), tap = null, hoverAt = null, hoverFrame = 0;
    function local(e) { var r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
    canvas.addEventListener("pointerdown", function (e) {
      if (e.button > 0) return;
      canvas.setPointerCapture(e.pointerId);
      pointers.set(e.pointerId, local(e));
      tap = pointers.size === 1 ? { x: e.clientX, y: e.clientY, type: e.pointerType } : null;
    });
    canvas.addEventListener("pointermove", function (e) {
      var was = pointers.get(e.pointerId);
      if (!was) {
        if (e.pointerType !== "mouse") return;
        hoverAt = [e.clientX, e.clientY];
        if (!hoverFrame) hoverFrame = window.requestAnimationFrame(function () {
          hoverFrame = 0;
          var i = pick(hoverAt[0], hoverAt[1]);
          if (i !== tipFor) showTip(i);
          canvas.style.cursor = i >= 0 ? "pointer" : "";
        });
        return;
      }
      var now = local(e);
      if (tap && Math.abs(e.clientX - tap.x) + Math.abs(e.clientY - tap.y) > 6) tap = null;
      if (pointers.size === 1) {
        panBy(now[0] - was[0], now[1] - was[1]);
      } else if (pointers.size === 2) {
        var other = null;
        pointers.forEach(function (p, id) { if (id !== e.pointerId) other = p; });
        var d0 = Math.hypot(was[0] - other[0], was[1] - other[1]), d1 = Math.hypot(now[0] - other[0], now[1] - other[1]);
        panBy((now[0] - was[0]) / 2, (now[1] - was[1]) / 2);
        if (d0 > 0) zoomAt((now[0] + other[0]) / 2, (now[1] + other[1]) / 2, d1 / d0);
      }
      pointers.set(e.pointerId, now);
      if (tipFor >= 0) showTip(-1);
    });
    function release(e) {
      if (!pointers.delete(e.pointerId)) return;
      if (e.type !== "pointerup" || !tap) return;
      var i = pick(e.clientX, e.clientY, tap.type === "mouse" ? 3 : 10);
      // A mouse click opens the point; a tap shows its tip first and opens it on a second tap.
      if (i >= 0 && opts.open && (tap.type === "mouse" || i === tipFor)) opts.open(i);
      else showTip(i);
      tap = null;
    }
    canvas.addEventListener("pointerup", release);
    canvas.addEventListener("pointercancel", release);
    canvas.addEventListener("pointerleave", function (e) { if (e.pointerType === "mouse" && !pointers.size) showTip(-1); });
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      var p = local(e), dy = e.deltaY * (e.deltaMode === 1 ? 32 : e.deltaMode === 2 ? h : 1);
      zoomAt(p[0], p[1], Math.exp(-dy * 0.002));
    }, { passive: false });
    // Keys, for a reader without a pointer: arrows pan, + and - zoom, 0 fits everything.
    canvas.tabIndex = 0;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", opts.label || "a scatter plot: arrows pan, + and - zoom, 0 shows every point");
    canvas.addEventListener("keydown", function (e) {
      var step = 60, keys = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (keys[e.key]) panBy(keys[e.key][0], keys[e.key][1]);
      else if (e.key === "+" || e.key === "=") zoomAt(w / 2, h / 2, 1.5);
      else if (e.key === "-") zoomAt(w / 2, h / 2, 1 / 1.5);
      else if (e.key === "0") api.fit();
      else return;
      e.preventDefault();
    });
    if (window.ResizeObserver) new ResizeObserver(function () { resize(); draw(); }).observe(container);
    resize();

    var api = {
      backend: gl ? "webgl" : "2d",
      setPoints: function (x, y, g) {
        n = x.length; X = x; Y = y; G = g;
        box = [Infinity, -Infinity, Infinity, -Infinity];
        for (var i = 0; i < n; i++) {
          if (x[i] !== x[i] || y[i] !== y[i]) continue;
          if (x[i] < box[0]) box[0] = x[i];
          if (x[i] > box[1]) box[1] = x[i];
          if (y[i] < box[2]) box[2] = y[i];
          if (y[i] > box[3]) box[3] = y[i];
        }
        if (box[0] > box[1]) box = [0, 1, 0, 1];
        // Points shrink as there are more of them: 7 px for a few hundred, 2 px for half a million.
        base = Math.max(2, Math.min(7, 12 - 2 * Math.log10(Math.max(n, 1))));
        buildGrid();
        if (gl) {
          var xy = new Float32Array(2 * n);
          for (var j = 0; j < n; j++) {
            var ok = x[j] === x[j] && y[j] === y[j];
            xy[2 * j] = ok ? x[j] : 1e30;       // a missing position lands far outside the view
            xy[2 * j + 1] = ok ? y[j] : 1e30;
          }
          buffer("a_xy", xy, 2, gl.FLOAT, false);
          buffer("a_group", g, 1, gl.FLOAT, false);
        }
        api.fit();
      },
      setColours: function (rgb) {
        RGB = rgb;
        if (gl) {
          if (!rgbBuffer) rgbBuffer = buffer("a_rgb", rgb, 3, gl.UNSIGNED_BYTE, true);
          else { gl.bindBuffer(gl.ARRAY_BUFFER, rgbBuffer); gl.bufferSubData(gl.ARRAY_BUFFER, 0, rgb); }
        } else {
          var groups = new Map();
          for (var i = 0; i < n; i++) {
            if (X[i] !== X[i] || Y[i] !== Y[i]) continue;
            var key = (rgb[3 * i] << 16) | (rgb[3 * i + 1] << 8) | rgb[3 * i + 2];
            if (!groups.has(key)) groups.set(key, []);
            groups.get(key).push(i);
          }
          byColour = [];
          groups.forEach(function (items, key) {
            byColour.push({ style: "#" + (0x1000000 + key).toString(16).slice(1), items: items });
          });
        }
        redraw();
      },
      showGroup: function (g) { group = g; showTip(-1); redraw(); },
      setNames: function (list) {
        names = list;
        namesLayer.textContent = "";
        nameEls = list.map(function (item) {
          var el = doc.createElement("span");
          el.className = "atlas-scatter-name";
          el.textContent = item.text;
          namesLayer.appendChild(el);
          return el;
        });
        nameEls.forEach(function (el, a) { names[a].width = el.offsetWidth; names[a].height = el.offsetHeight; });
        place();
      },
      highlight: function (i) { marked = i; place(); },
      centre: function (x, y, half) {
        view.cx = x; view.cy = y;
        view.k = Math.max(fitK * MIN_ZOOM, Math.min(fitK * MAX_ZOOM, Math.min(w, h) / 2 / half));
        draw();
      },
      fit: function () {
        var dx = (box[1] - box[0]) || 1, dy = (box[3] - box[2]) || 1;
        view.cx = (box[0] + box[1]) / 2; view.cy = (box[2] + box[3]) / 2;
        view.k = fitK = 0.95 * Math.min(w / dx, h / dy);
        draw();
      },
      draw: draw,
      pick: pick,
      project: project,
      colour: function (i) { return [RGB[3 * i], RGB[3 * i + 1], RGB[3 * i + 2]]; },
      // The data rectangle on screen: x and y ranges, as [low, high].
      view: function () {
        return { x: [view.cx - w / 2 / view.k, view.cx + w / 2 / view.k], y: [view.cy - h / 2 / view.k, view.cy + h / 2 / view.k] };
      }
    };
    container.atlasScatter = api;
    return api;
  };
})();
