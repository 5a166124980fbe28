// The map page: every neuron a point, drawn by atlas-scatter.js, coloured by cluster or by
// layer, a layer filter, named clusters (concept first) on the plot, a legend, a search box, and
// ?n=L/N to highlight and centre one neuron. Labels are untrusted text: everything here that
// shows one (legend, status, names on the plot, hover tip) writes it as DOM text.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("atlas-map-data").textContent);
  var el = document.getElementById("atlas-map");
  var status = document.getElementById("atlas-map-status");
  var found = document.getElementById("atlas-map-found");
  var legend = document.getElementById("atlas-map-legend");
  var colourSelect = document.getElementById("atlas-map-colour");
  var layerSelect = document.getElementById("atlas-map-layer");
  var form = document.getElementById("atlas-map-form");
  var query = document.getElementById("atlas-map-search");
  var nLayers = data.layers.length;
  var clusterLabel = data.clusters.label, clusterSize = data.clusters.size;
  var NAMED = window.innerWidth < 600 ? 20 : 70;    // cluster names offered to the plot (it shows those that fit)
  var LEGEND = window.innerWidth < 600 ? 4 : 8;     // clusters listed in the legend
  // Point colours all have a WCAG relative luminance near 0.2, so each keeps a contrast of
  // about 4:1 against the light page (#fff) and the dark one (slate, #1e2129): 12 hues at
  // OKLCH chroma <= 0.16 for clusters, and a blue-to-red ramp of the same hues for layers
  // (tests/site/test_map_browser.py checks every drawn point against both backgrounds).
  var SCALES = {
    cluster: ["#d0524e", "#bf6309", "#9d7601", "#788204", "#258e33", "#0e8c74",
              "#118993", "#0d84b6", "#4e77dc", "#8968d4", "#b05bb5", "#c85287"],
    layer: ["#4e77dc", "#0d84b6", "#118993", "#0e8c74", "#258e33", "#788204", "#9d7601", "#bf6309", "#d0524e"]
  };
  function rgb(hex) { var v = parseInt(hex.slice(1), 16); return [v >> 16, (v >> 8) & 255, v & 255]; }
  // Neighbouring cluster ids get far-apart hues: golden-ratio steps around the palette.
  function clusterColour(c) {
    var p = SCALES.cluster;
    return rgb(p[Math.floor(((c * 0.6180339887) % 1) * p.length)]);
  }
  function layerColour(layer) {
    var stops = SCALES.layer, t = nLayers > 1 ? layer / (nLayers - 1) : 0.5;
    var f = t * (stops.length - 1), i = Math.min(Math.floor(f), stops.length - 2), u = f - i;
    var a = rgb(stops[i]), b = rgb(stops[i + 1]);
    return a.map(function (v, j) { return Math.round(v * (1 - u) + b[j] * u); });
  }
  function css(c) { return "rgb(" + c.join(",") + ")"; }
  var bySize = clusterLabel.map(function (_, c) { return c; })
    .sort(function (a, b) { return clusterSize[b] - clusterSize[a] || a - b; });

  function drawLegend(by) {
    legend.textContent = "";
    if (by === "layer") {
      var bar = document.createElement("span");
      bar.className = "atlas-map-gradient";
      bar.style.background = "linear-gradient(to right," + SCALES.layer.join(",") + ")";
      var lo = document.createElement("span"), hi = document.createElement("span");
      lo.textContent = "layer 0";
      hi.textContent = String(nLayers - 1);
      legend.append(lo, bar, hi);
      return;
    }
    bySize.slice(0, LEGEND).forEach(function (c) {
      var item = document.createElement("span"), swatch = document.createElement("span"), name = document.createElement("span");
      swatch.className = "atlas-map-swatch";
      swatch.style.background = css(clusterColour(c));
      name.className = "atlas-map-name";
      name.textContent = clusterLabel[c] || "cluster " + c;
      item.append(swatch, name);
      item.title = name.textContent + " (cluster " + c + ", " + clusterSize[c].toLocaleString() + " neurons)";
      legend.append(item);
    });
    if (bySize.length > LEGEND) {
      var more = document.createElement("a");
      more.href = "../clusters/";
      more.textContent = "all " + bySize.length.toLocaleString() + " clusters";
      legend.append(more);
    }
  }
  drawLegend(colourSelect.value);

  var layers = [];
  data.layers.forEach(function (n, layer) { if (n > 0) layers.push(layer); });
  Promise.all(layers.map(function (layer) {
    return fetch("points/" + layer + ".json").then(function (r) {
      if (!r.ok) throw new Error("points/" + layer + ".json: HTTP " + r.status);
      return r.json();
    });
  })).then(function (parts) {
    // All layers in one set of arrays; point i is neuron i - first[k] of layers[k].
    var first = [], total = 0;
    parts.forEach(function (p) { first.push(total); total += p.x.length; });
    var X = new Float32Array(total), Y = new Float32Array(total), G = new Float32Array(total);
    var cluster = new Int32Array(total), sum = {}, xs = [Infinity, -Infinity], ys = [Infinity, -Infinity];
    parts.forEach(function (p, k) {
      for (var j = 0, i = first[k]; j < p.x.length; j++, i++) {
        var x = p.x[j], y = p.y[j], c = p.cluster[j];
        X[i] = x == null ? NaN : x;
        Y[i] = y == null ? NaN : y;
        G[i] = layers[k];
        cluster[i] = c == null ? -1 : c;
        if (c != null && x != null && y != null) {
          var s = sum[c] || (sum[c] = [0, 0, 0]);
          s[0] += x; s[1] += y; s[2] += 1;
        }
        if (x != null) { xs[0] = Math.min(xs[0], x); xs[1] = Math.max(xs[1], x); }
        if (y != null) { ys[0] = Math.min(ys[0], y); ys[1] = Math.max(ys[1], y); }
      }
    });
    var labels = parts.map(function (p) { return p.label; });
    function where(i) {               // point index -> [layer, neuron]
      var k = 0;
      while (k + 1 < first.length && first[k + 1] <= i) k++;
      return [layers[k], i - first[k]];
    }
    function colours(by) {
      var out = new Uint8Array(3 * total), grey = [120, 120, 120];
      var byLayer = layers.map(layerColour), k = 0;
      for (var i = 0; i < total; i++) {
        while (k + 1 < first.length && first[k + 1] <= i) k++;
        var c = by === "layer" ? byLayer[k] : cluster[i] < 0 ? grey : clusterColour(cluster[i]);
        out[3 * i] = c[0]; out[3 * i + 1] = c[1]; out[3 * i + 2] = c[2];
      }
      return out;
    }
    function open(i) {
      var at = where(i);
      window.location.href = "../neurons/" + at[0] + "/" + at[1] + "/";
    }
    function tip(i) {
      var at = where(i), label = labels[layers.indexOf(at[0])][at[1]], c = cluster[i];
      var lines = ["L" + at[0] + "/N" + at[1] + "  " + (label || "")];
      if (c >= 0) lines.push("cluster " + c + ": " + (clusterLabel[c] || ""));
      return lines;
    }

    var scatter = window.AtlasScatter(el, { tip: tip, open: open,
      label: "Map of " + total.toLocaleString() + " neurons: arrows pan, + and - zoom, 0 shows all; the find box above reaches one neuron" });
    scatter.setPoints(X, Y, G);
    scatter.setColours(colours(colourSelect.value));
    // Cluster names at their clusters' centroids, so the plot reads without hovering: those
    // named by a concept first, then by a kind of token, then by their tokens, biggest first
    // within each, where they fit. A concept shows its word ("months"), a kind its kind and
    // first two tokens ("Python names: pathlib, hashlib"); the legend and pages have the rest.
    var named = data.clusters.named || [], rank = { c: 0, k: 1 };
    function rankOf(c) { return rank[named[c]] !== undefined ? rank[named[c]] : 2; }
    function plotName(c) {
      var label = clusterLabel[c] || "cluster " + c, cut = label.indexOf(" (");
      if (named[c] === "c" && cut > 0) return label.slice(0, cut);
      if (named[c] === "k" && cut > 0) {
        var tokens = label.slice(label.indexOf("): ") + 3).split(", ");
        return label.slice(0, cut) + ": " + tokens.slice(0, 2).join(", ");
      }
      return label;
    }
    var byName = bySize.slice().sort(function (a, b) { return rankOf(a) - rankOf(b) || clusterSize[b] - clusterSize[a] || a - b; });
    scatter.setNames(byName.filter(function (c) { return sum[c]; }).slice(0, NAMED).map(function (c) {
      var s = sum[c];
      return { x: s[0] / s[2], y: s[1] / s[2], text: plotName(c) };
    }));
    scatter.draw();
    el.setAttribute("data-points", String(total));

    function showCount() {
      var v = layerSelect.value;
      var shown = v === "all" ? total : parts[layers.indexOf(Number(v))].x.length;
      el.setAttribute("data-shown", String(shown));
      status.textContent = (v === "all" ? total.toLocaleString() + " neurons"
        : shown.toLocaleString() + " of " + total.toLocaleString() + " neurons, layer " + v) +
        (scatter.backend === "webgl" ? "" : " (no WebGL: drawn on a 2D canvas, slower)");
    }

    // Highlight neuron N of layer L, centre the view on it, and say so in words.
    function locate(layer, n, note) {
      var k = layers.indexOf(layer), i = k < 0 ? -1 : first[k] + n;
      if (k < 0 || !(n >= 0 && n < parts[k].x.length) || X[i] !== X[i]) {
        found.textContent = "no neuron L" + layer + "/N" + n + " on this map";
        el.removeAttribute("data-highlight");
        scatter.highlight(-1);
        return;
      }
      if (layerSelect.value !== "all" && layerSelect.value !== String(layer)) {
        layerSelect.value = "all";
        applyLayer();
      }
      scatter.centre(X[i], Y[i], Math.max(xs[1] - xs[0], ys[1] - ys[0]) / 8 || 1);
      scatter.highlight(i);
      el.setAttribute("data-highlight", layer + "/" + n);
      found.textContent = (note ? note + ": " : "");
      var a = document.createElement("a");
      a.href = "../neurons/" + layer + "/" + n + "/";
      a.textContent = "L" + layer + "/N" + n;
      found.append(a, document.createTextNode(" " + (labels[k][n] || "")));
    }

    // Search: "L/N" (or "L3/N7") finds that neuron; other text finds labels containing it,
    // and asking again steps to the next match.
    var last = { q: null, hits: [], at: 0 };
    function search(q) {
      q = q.trim();
      var m = /^L?(\d+)\s*\/\s*N?(\d+)$/i.exec(q);
      if (m) return locate(Number(m[1]), Number(m[2]));
      if (!q) return;
      if (q !== last.q) {
        var needle = q.toLowerCase(), hits = [];
        labels.forEach(function (ls, k) {
          for (var j = 0; j < ls.length; j++) {
            if (ls[j] && ls[j].toLowerCase().indexOf(needle) >= 0) hits.push([layers[k], j]);
          }
        });
        last = { q: q, hits: hits, at: -1 };
      }
      if (!last.hits.length) {
        found.textContent = "no label contains \u201c" + q + "\u201d";
        el.removeAttribute("data-highlight");
        scatter.highlight(-1);
        return;
      }
      last.at = (last.at + 1) % last.hits.length;
      var hit = last.hits[last.at];
      locate(hit[0], hit[1], "match " + (last.at + 1) + " of " + last.hits.length.toLocaleString());
    }

    function applyLayer() {
      scatter.showGroup(layerSelect.value === "all" ? -1 : Number(layerSelect.value));
      showCount();
    }

    showCount();
    colourSelect.addEventListener("change", function () {
      scatter.setColours(colours(colourSelect.value));
      drawLegend(colourSelect.value);
    });
    layerSelect.addEventListener("change", applyLayer);
    form.addEventListener("submit", function (ev) { ev.preventDefault(); search(query.value); });
    var want = /^(\d+)\/(\d+)$/.exec(new URLSearchParams(window.location.search).get("n") || "");
    if (want) locate(Number(want[1]), Number(want[2]));
    el.setAttribute("data-ready", "");
  }).catch(function (err) {
    status.textContent = "could not draw the map: " + err.message;
    throw err;
  });
})();
