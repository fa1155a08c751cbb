// Ask before destructive actions: a form with data-confirm submits only if the user agrees.
// (A static file, so the Content-Security-Policy can forbid inline scripts.)
document.addEventListener("submit", function (event) {
  var message = event.target.getAttribute && event.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) event.preventDefault();
}, true);
