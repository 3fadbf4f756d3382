// Renders /openapi.json with Swagger UI (its files are served by this service). The
// document's server is replaced by this page's origin, so "Try it out" calls this service.
fetch("/openapi.json")
  .then((response) => response.json())
  .then((spec) => {
    spec.servers = [{ url: window.location.origin, description: "This service" }];
    window.ui = window.SwaggerUIBundle({
      spec,
      dom_id: "#swagger-ui",
      deepLinking: true,
      validatorUrl: null, // the public validator badge would call out
      presets: [window.SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
    });
  });
