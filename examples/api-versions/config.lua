-- examples/api-versions: two API generations of one resource, configured
-- from the environment (secrets never go in this file):
--
--   SESSION_SECRET   HMAC key of v2 session cookies (at least 32 bytes)
--   JWT_SECRET       HS256 key of the v3 tokens this app issues (32+ bytes),
--   or JWT_KEY_FILE  a P-256 private key (PEM) to issue ES256 tokens instead
--   WXD_REDIS_URL    sessions in Redis (several nodes); default: in memory
local redis_url = os.getenv("WXD_REDIS_URL")
return {
  listen = "127.0.0.1:8080",
  redis = redis_url and { url = redis_url } or nil,
  store = redis_url and { backend = "redis", prefix = "apiv:" } or { backend = "memory" },
}
