// Light or dark on atlas's own pages (neurons, clusters, map, search), which load no theme
// JavaScript. The scheme follows the system until the reader picks one with the header's
// toggle; the choice is kept where mkdocs-material keeps its own (localStorage, key
// "<site path>.__palette", value {index, color}), so frame and atlas pages agree.
// Loaded at the top of <body>, before anything is painted. It also gives <body> the palette's
// colours, which the pages do not repeat: the site's palette is written into PALETTE below when
// the site is rendered (frame.theme_palette).
(function () {
  "use strict";
  var PALETTE = {"primary": "indigo", "accent": "indigo"};
  var site = new URL("..", document.currentScript.src);      // this file is <site>/assets/atlas-theme.js
  var key = site.pathname + ".__palette";
  var dark = window.matchMedia("(prefers-color-scheme: dark)");
  var body = document.body;
  body.setAttribute("data-md-color-primary", PALETTE.primary);
  body.setAttribute("data-md-color-accent", PALETTE.accent);

  function chosen() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(key));
      // the theme's "automatic" option stores the media query alone: that is no choice
      if (saved && saved.color && saved.color.media !== "(prefers-color-scheme)") return saved.color.scheme;
    } catch (err) { /* no storage (file://, private mode): follow the system */ }
    return null;
  }

  function apply() {
    var scheme = chosen() || (dark.matches ? "slate" : "default");
    body.setAttribute("data-md-color-scheme", scheme);
    var button = document.querySelector(".atlas-scheme");
    if (button) button.setAttribute("aria-label", scheme === "slate" ? "Switch to light mode" : "Switch to dark mode");
  }

  function toggle() {
    var scheme = body.getAttribute("data-md-color-scheme") === "slate" ? "default" : "slate";
    var color = {
      media: scheme === "slate" ? "(prefers-color-scheme: dark)" : "(prefers-color-scheme: light)",
      scheme: scheme,
      primary: PALETTE.primary,
      accent: PALETTE.accent
    };
    try {
      window.localStorage.setItem(key, JSON.stringify({ index: scheme === "slate" ? 1 : 0, color: color }));
    } catch (err) { /* not kept, but this page still switches */ }
    body.setAttribute("data-md-color-scheme", scheme);
    apply();
  }

  apply();
  if (dark.addEventListener) dark.addEventListener("change", apply);
  // The toggle exists only where it works: with this script.
  document.addEventListener("DOMContentLoaded", function () {
    var bar = document.querySelector(".atlas-bar .md-header__inner");
    if (!bar) return;
    var button = document.createElement("button");
    button.type = "button";
    button.className = "atlas-scheme";
    button.textContent = "\u25d0";                              // a half-filled circle
    button.addEventListener("click", toggle);
    bar.appendChild(button);
    apply();
  });
})();
