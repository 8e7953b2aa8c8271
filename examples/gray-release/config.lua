-- examples/gray-release: a new version of the order API for part of the
-- traffic. Edit the rules (or GRAY_PERCENT) and `wxd reload`: the next
-- request follows them, nothing restarts. docs/gray.md has the details.
return {
  listen = "127.0.0.1:8080",
  gray = {
    rules = {
      -- The first rule that holds gives the colour.
      { name = "new-miniapp", colour = "v2", header = { "X-Wechat-Scene", "miniapp_v3" } },
      { name = "staff", colour = "v2", openids = { "oStaff00000000000000000001", "oStaff00000000000000000002" } },
      { name = "shanghai", colour = "sh", header = { "X-User-Region", "shanghai" } },
      -- A stable 5% of users (by X-OpenID): the same user stays on the same side.
      { name = "canary", colour = "v2", percent = env("GRAY_PERCENT", 5) },
    },
  },
  -- Where /recommend calls (this app itself, for the example).
  app = { recommend_base = env("RECOMMEND_BASE", "http://127.0.0.1:8080") },
}
