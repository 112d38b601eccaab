// Renders the math that pymdownx.arithmatex marks (\( \) inline, \[ \] display)
// with KaTeX, on every page load (also with instant navigation).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
