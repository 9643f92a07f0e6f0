// Clarifai's npm client (v2, as old apps use it) against a live server: prints the response as JSON.
// usage: node predict.js <apiEndpoint> <apiKey> <modelId> <url-or-base64> [configJSON]
const Clarifai = require('clarifai');

const [endpoint, apiKey, modelId, input, config] = process.argv.slice(2);
const app = new Clarifai.App({ apiKey, apiEndpoint: endpoint });
// a constant name (GENERAL_MODEL, COLOR_MODEL, NSFW_MODEL, …) stands for the id the client exports under it
const model = /^[A-Z_]+_MODEL$/.test(modelId) ? Clarifai[modelId] : modelId;

app.models.predict(model, input, config ? JSON.parse(config) : {}).then(
  (response) => {
    process.stdout.write(JSON.stringify({ ok: true, response: response.rawData }));
  },
  (err) => {
    const res = err && err.response;
    process.stdout.write(JSON.stringify({
      ok: false,
      http_status: res ? res.status : null,
      body: res ? res.data : null,
      message: String((err && err.message) || err),
    }));
  },
);
