// The map page: every neuron a point, one WebGL trace per layer (so the layer filter only
// toggles visibility), coloured by cluster or by layer. Labels are untrusted text: plotly
// reads markup in hover text, so every string is escaped before it reaches plotly.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("atlas-map-data").textContent);
  var el = document.getElementById("atlas-map");
  var status = document.getElementById("atlas-map-status");
  var colourSelect = document.getElementById("atlas-map-colour");
  var layerSelect = document.getElementById("atlas-map-layer");
  // Only what can start markup or an entity: plotly's hover text decodes &lt; &gt; &amp; but shows
  // &quot; as it is, and a quote outside a tag is plain text.
  var ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;" };
  function esc(s) { return String(s == null ? "" : s).replace(/[&<>]/g, function (c) { return ESC[c]; }); }
  var nLayers = data.layers.length;
  var clusterLabel = data.clusters.label;
  // Neighbouring cluster ids get far-apart hues: golden-ratio steps around the colour scale.
  function clusterHue(c) { return (c * 0.6180339887) % 1; }
  function layerHue(layer) { return nLayers > 1 ? layer / (nLayers - 1) : 0.5; }
  var SCALES = { cluster: "Rainbow", layer: "Viridis" };
  var hasWebGL = (function () {
    try { var c = document.createElement("canvas"); return !!(c.getContext("webgl") || c.getContext("experimental-webgl")); }
    catch (e) { return false; }
  })();

  var layers = [];
  data.layers.forEach(function (n, layer) { if (n > 0) layers.push(layer); });
  Promise.all(layers.map(function (layer) {
    return fetch("points/" + layer + ".json").then(function (r) {
      if (!r.ok) throw new Error("points/" + layer + ".json: HTTP " + r.status);
      return r.json();
    });
  })).then(function (parts) {
    var colours = { cluster: [], layer: [] };
    var total = parts.reduce(function (s, p) { return s + p.x.length; }, 0);
    // Points shrink as there are more of them: 7 px for a few hundred, 2 px for half a million.
    var size = Math.max(2, Math.min(7, 12 - 2 * Math.log10(Math.max(total, 1))));
    var traces = parts.map(function (p, i) {
      var layer = layers[i], n = p.x.length, text = new Array(n), byCluster = new Array(n);
      for (var j = 0; j < n; j++) {
        var c = p.cluster[j];
        text[j] = "L" + layer + "/N" + j + "  " + esc(p.label[j]) +
          (c == null ? "" : "<br>cluster " + c + ": " + esc(clusterLabel[c]));
        byCluster[j] = c == null ? 0 : clusterHue(c);
      }
      colours.cluster.push(byCluster);
      colours.layer.push(new Array(n).fill(layerHue(layer)));
      return {
        type: hasWebGL ? "scattergl" : "scatter", mode: "markers", name: "layer " + layer,
        x: p.x, y: p.y, text: text, hoverinfo: "text",
        marker: { size: size, opacity: 0.8, color: byCluster, colorscale: SCALES.cluster, cmin: 0, cmax: 1 }
      };
    });
    var layout = {
      margin: { l: 0, r: 0, t: 0, b: 0 }, showlegend: false, dragmode: "pan", hovermode: "closest",
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
      plot_bgcolor: "rgba(0,0,0,0)", paper_bgcolor: "rgba(0,0,0,0)"
    };
    return Plotly.newPlot(el, traces, layout, { scrollZoom: true, responsive: true, displaylogo: false })
      .then(function () {
        status.textContent = total.toLocaleString() + " neurons" + (hasWebGL ? "" : " (no WebGL: slow drawing)");
        el.setAttribute("data-points", String(total));

        colourSelect.addEventListener("change", function () {
          var by = colourSelect.value;
          Plotly.restyle(el, { "marker.color": colours[by], "marker.colorscale": SCALES[by] });
        });
        layerSelect.addEventListener("change", function () {
          var v = layerSelect.value;
          Plotly.restyle(el, { visible: layers.map(function (layer) { return v === "all" || String(layer) === v; }) });
        });
        el.on("plotly_click", function (ev) {
          var p = ev.points && ev.points[0];
          if (!p) return;
          window.location.href = "../neurons/" + layers[p.curveNumber] + "/" + p.pointNumber + "/";
        });
      });
  }).catch(function (err) {
    status.textContent = "could not draw the map: " + err.message;
    throw err;
  });
})();
