// Starts Swagger UI on /docs. A file rather than an inline script, so /docs runs under the same
// Content-Security-Policy as the page (no 'unsafe-inline'). The OpenAPI URL comes from the page.
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // no badge fetched from validator.swagger.io
  presets: [SwaggerUIBundle.presets.apis],
});
