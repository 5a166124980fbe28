// Token and label text is untrusted: pages put it in through textContent only, made visible as
// the site's Python does it (atlas/site/text.py: show_token and visible are the twins of these).
// Loaded before the neuron page's and the search page's own scripts.
(function () {
  "use strict";
  var SYMBOLS = { " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5" };
  var INVISIBLE = /^[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]$/u;

  function reveal(text, symbols) {
    return Array.from(text, function (ch) {
      if (symbols[ch] !== undefined) return symbols[ch];
      return INVISIBLE.test(ch) ? "\u27e8U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") + "\u27e9" : ch;
    }).join("");
  }

  window.atlasText = {
    // A token with whitespace and invisible characters shown; the empty token as ∅.
    showToken: function (token) { return (token == null ? "" : reveal(token, SYMBOLS)) || "\u2205"; },
    // A label on one line, control and direction-changing characters shown as code points.
    visible: function (label) { return label ? reveal(label.split(/\s+/).filter(Boolean).join(" "), { " ": " " }) : ""; }
  };
})();
