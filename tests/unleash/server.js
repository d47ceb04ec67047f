// Starts an Unleash server for the flag tests. Everything else comes from the
// environment Unleash reads itself: DATABASE_URL, HTTP_PORT,
// INIT_ADMIN_API_TOKENS, INIT_BACKEND_API_TOKENS, LOG_LEVEL.
// Run with NODE_PATH pointing at the node_modules that setup.sh installed.
const unleash = require('unleash-server');

unleash
  .start({
    // Admin API calls in the tests use an admin API token; nobody logs in.
    db: { ssl: false },
    // The clients poll every second; don't make the server's own caches lag.
    server: { enableRequestLogger: false, keepAliveTimeout: 1000 },
  })
  .catch((err) => {
    console.error(err);
    process.exit(1);
  });
