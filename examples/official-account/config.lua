-- examples/official-account: a WeChat Official Account bot, configured from
-- the environment (secrets never go in this file):
--
--   WXD_MP_APPID         the account's appid (wx...)
--   WXD_MP_TOKEN         the Token of the server configuration (服务器配置)
--   WXD_MP_AES_KEY       the EncodingAESKey, for compatible and safe mode;
--                        leave it unset in plaintext mode
--   WXD_MP_SECRET        the AppSecret: for the access_token (late replies
--                        through the customer-service API, /jssdk/config);
--                        optional
--   WXD_WECHAT_API_BASE  default https://api.weixin.qq.com
return {
  listen = "127.0.0.1:8080",
  mp = {
    appid = env("WXD_MP_APPID"),
    token = env("WXD_MP_TOKEN"),
    aes_key = env("WXD_MP_AES_KEY", false),
    secret = env("WXD_MP_SECRET", false),
    api_base = env("WXD_WECHAT_API_BASE", "https://api.weixin.qq.com"),
  },
}
