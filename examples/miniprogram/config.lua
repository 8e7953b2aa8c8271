-- examples/miniprogram: a Mini Program's login and user-data backend,
-- configured from the environment (secrets never go in this file):
--
--   WXD_MINI_APPID       the Mini Program's appid (wx...)
--   WXD_MINI_SECRET      its AppSecret (for code2session and the access_token)
--   WXD_WECHAT_API_BASE  default https://api.weixin.qq.com
return {
  listen = "127.0.0.1:8080",
  miniprogram = {
    appid = env("WXD_MINI_APPID"),
    secret = env("WXD_MINI_SECRET"),
    api_base = env("WXD_WECHAT_API_BASE", "https://api.weixin.qq.com"),
    session_ttl = 86400, -- seconds a login lasts on this server
  },
}
