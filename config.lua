-- Configuration of the default app. Every key is optional; see README.md
-- ("Configuration") for the full list and defaults. Secrets never go here:
-- write env("WXD_SOMETHING") and set the variable in the environment.
return {
  listen = "127.0.0.1:8080",
  workers = "auto",
  log = { level = "info", access = true },
}
