// The map page: every neuron a point, one WebGL trace per layer (so the layer filter only
// toggles visibility), coloured by cluster or by layer, the biggest clusters named on the plot,
// a legend, a search box, and ?n=L/N to highlight and centre one neuron. Labels are untrusted
// text: plotly reads markup in hover text and annotations, so every string is escaped once
// before it reaches plotly, and the legend and status are written as DOM text.
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
  // Only what can start markup or an entity: plotly's hover text decodes &lt; &gt; &amp; but shows
  // &quot; as it is, and a quote outside a tag is plain text.
  var ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;" };
  function esc(s) { return String(s == null ? "" : s).replace(/[&<>]/g, function (c) { return ESC[c]; }); }
  var nLayers = data.layers.length;
  var clusterLabel = data.clusters.label, clusterSize = data.clusters.size;
  var NAMED = window.innerWidth < 600 ? 6 : 12;     // cluster names on the plot, biggest first
  var LEGEND = window.innerWidth < 600 ? 4 : 8;     // clusters listed in the legend
  // Colour scales as stops, so the legend shows exactly the colours plotly draws.
  var SCALES = {
    cluster: ["#96005a", "#0000c8", "#0098ff", "#2cff96", "#97ff00", "#ffea00", "#ff6f00", "#ff0000"],
    layer: ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
  };
  function plotlyScale(stops) { return stops.map(function (c, i) { return [i / (stops.length - 1), c]; }); }
  function scaleColour(stops, t) {
    var f = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(Math.floor(f), stops.length - 2);
    var a = parseInt(stops[i].slice(1), 16), b = parseInt(stops[i + 1].slice(1), 16), w = f - i;
    return "rgb(" + [16, 8, 0].map(function (s) {
      return Math.round(((a >> s) & 255) * (1 - w) + ((b >> s) & 255) * w);
    }).join(",") + ")";
  }
  // Neighbouring cluster ids get far-apart hues: golden-ratio steps around the colour scale.
  function clusterHue(c) { return (c * 0.6180339887) % 1; }
  function layerHue(layer) { return nLayers > 1 ? layer / (nLayers - 1) : 0.5; }
  var hasWebGL = (function () {
    try { var c = document.createElement("canvas"); return !!(c.getContext("webgl") || c.getContext("experimental-webgl")); }
    catch (e) { return false; }
  })();
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
      var item = document.createElement("span"), swatch = document.createElement("span");
      swatch.className = "atlas-map-swatch";
      swatch.style.background = scaleColour(SCALES.cluster, clusterHue(c));
      item.append(swatch, document.createTextNode(clusterLabel[c] || "cluster " + c));
      item.title = "cluster " + c + ", " + clusterSize[c].toLocaleString() + " neurons";
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
    var colours = { cluster: [], layer: [] }, traceIndex = parts.map(function (_, i) { return i; });
    var total = parts.reduce(function (s, p) { return s + p.x.length; }, 0);
    var sum = {}, xs = [Infinity, -Infinity], ys = [Infinity, -Infinity];
    // Points shrink as there are more of them: 7 px for a few hundred, 2 px for half a million.
    var size = Math.max(2, Math.min(7, 12 - 2 * Math.log10(Math.max(total, 1))));
    var traces = parts.map(function (p, i) {
      var layer = layers[i], n = p.x.length, text = new Array(n), byCluster = new Array(n);
      for (var j = 0; j < n; j++) {
        var c = p.cluster[j], x = p.x[j], y = p.y[j];
        text[j] = "L" + layer + "/N" + j + "  " + esc(p.label[j]) +
          (c == null ? "" : "<br>cluster " + c + ": " + esc(clusterLabel[c]));
        byCluster[j] = c == null ? 0 : clusterHue(c);
        if (c != null && x != null && y != null) {
          var s = sum[c] || (sum[c] = [0, 0, 0]);
          s[0] += x; s[1] += y; s[2] += 1;
        }
        if (x != null) { xs[0] = Math.min(xs[0], x); xs[1] = Math.max(xs[1], x); }
        if (y != null) { ys[0] = Math.min(ys[0], y); ys[1] = Math.max(ys[1], y); }
      }
      colours.cluster.push(byCluster);
      colours.layer.push(new Array(n).fill(layerHue(layer)));
      return {
        type: hasWebGL ? "scattergl" : "scatter", mode: "markers", name: "layer " + layer,
        x: p.x, y: p.y, text: text, hoverinfo: "text",
        marker: { size: size, opacity: 0.8, color: byCluster, colorscale: plotlyScale(SCALES.cluster), cmin: 0, cmax: 1 }
      };
    });
    // The highlighted neuron: one SVG ring drawn above the WebGL points, empty until asked for.
    traces.push({ type: "scatter", mode: "markers", name: "highlight", x: [], y: [], hoverinfo: "skip",
                  marker: { size: 22, symbol: "circle-open", color: "#e0115f", line: { width: 3 } } });
    // Cluster names at the centroids of the biggest clusters, so the plot reads without hovering.
    var annotations = bySize.filter(function (c) { return sum[c]; }).slice(0, NAMED).map(function (c) {
      var s = sum[c];
      return { x: s[0] / s[2], y: s[1] / s[2], text: esc(clusterLabel[c] || "cluster " + c), showarrow: false,
               font: { size: 12, color: "#111" }, bgcolor: "rgba(255,255,255,.75)", borderpad: 2 };
    });
    var layout = {
      margin: { l: 0, r: 0, t: 0, b: 0 }, showlegend: false, dragmode: "pan", hovermode: "closest",
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" }, annotations: annotations,
      plot_bgcolor: "rgba(0,0,0,0)", paper_bgcolor: "rgba(0,0,0,0)"
    };
    var labels = parts.map(function (p) { return p.label; });

    function showCount() {
      var v = layerSelect.value;
      var shown = v === "all" ? total : parts[layers.indexOf(Number(v))].x.length;
      el.setAttribute("data-shown", String(shown));
      status.textContent = (v === "all" ? total.toLocaleString() + " neurons"
        : shown.toLocaleString() + " of " + total.toLocaleString() + " neurons, layer " + v) +
        (hasWebGL ? "" : " (no WebGL: slow drawing)");
    }

    // Highlight neuron N of layer L, centre the view on it, and say so in words.
    function locate(layer, n, note) {
      var i = layers.indexOf(layer), p = parts[i];
      if (i < 0 || !(n >= 0 && n < p.x.length) || p.x[n] == null) {
        found.textContent = "no neuron L" + layer + "/N" + n + " on this map";
        el.removeAttribute("data-highlight");
        return;
      }
      if (layerSelect.value !== "all" && layerSelect.value !== String(layer)) {
        layerSelect.value = "all";
        applyLayer();
      }
      var x = p.x[n], y = p.y[n], half = Math.max(xs[1] - xs[0], ys[1] - ys[0]) / 8 || 1;
      Plotly.restyle(el, { x: [[x]], y: [[y]] }, [traces.length - 1]);
      Plotly.relayout(el, { "xaxis.range": [x - half, x + half], "yaxis.range": [y - half, y + half] });
      el.setAttribute("data-highlight", layer + "/" + n);
      found.textContent = (note ? note + ": " : "");
      var a = document.createElement("a");
      a.href = "../neurons/" + layer + "/" + n + "/";
      a.textContent = "L" + layer + "/N" + n;
      found.append(a, document.createTextNode(" " + (labels[i][n] || "")));
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
        labels.forEach(function (ls, i) {
          for (var j = 0; j < ls.length; j++) {
            if (ls[j] && ls[j].toLowerCase().indexOf(needle) >= 0) hits.push([layers[i], j]);
          }
        });
        last = { q: q, hits: hits, at: -1 };
      }
      if (!last.hits.length) {
        found.textContent = "no label contains \u201c" + q + "\u201d";
        el.removeAttribute("data-highlight");
        return;
      }
      last.at = (last.at + 1) % last.hits.length;
      var hit = last.hits[last.at];
      locate(hit[0], hit[1], "match " + (last.at + 1) + " of " + last.hits.length.toLocaleString());
    }

    function applyLayer() {
      var v = layerSelect.value;
      Plotly.restyle(el, { visible: layers.map(function (layer) { return v === "all" || String(layer) === v; }) },
                     traceIndex);
      showCount();
    }

    return Plotly.newPlot(el, traces, layout, { scrollZoom: true, responsive: true, displaylogo: false })
      .then(function () {
        el.setAttribute("data-points", String(total));
        showCount();
        colourSelect.addEventListener("change", function () {
          var by = colourSelect.value;
          // An array value is spread over the traces, so each trace gets its own copy of the scale.
          var scale = plotlyScale(SCALES[by]);
          Plotly.restyle(el, { "marker.color": colours[by], "marker.colorscale": traceIndex.map(function () { return scale; }) },
                         traceIndex);
          drawLegend(by);
        });
        layerSelect.addEventListener("change", applyLayer);
        form.addEventListener("submit", function (ev) { ev.preventDefault(); search(query.value); });
        el.on("plotly_click", function (ev) {
          var p = ev.points && ev.points[0];
          if (!p || p.curveNumber >= layers.length) return;
          window.location.href = "../neurons/" + layers[p.curveNumber] + "/" + p.pointNumber + "/";
        });
        var want = /^(\d+)\/(\d+)$/.exec(new URLSearchParams(window.location.search).get("n") || "");
        if (want) locate(Number(want[1]), Number(want[2]));
        el.setAttribute("data-ready", "");
      });
  }).catch(function (err) {
    status.textContent = "could not draw the map: " + err.message;
    throw err;
  });
})();
