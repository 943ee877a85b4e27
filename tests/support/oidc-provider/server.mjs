// A real OpenID provider (npm oidc-provider) with a username/password login form, for one
// complete browser sign-in test. Configured by environment; binds 127.0.0.1 only.
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT);
const issuer = `http://localhost:${port}`;
const users = JSON.parse(process.env.USERS); // {sub: {password, email, name, fhirUser}}
// A SMART on FHIR EHR (App Launch v2, EHR launch), when SMART_LAUNCHES is set: its FHIR base is
// `${issuer}/fhir`, with .well-known/smart-configuration and Patient reads; each launch id
// names the patient (and encounter) the token response carries as context.
const launches = process.env.SMART_LAUNCHES ? JSON.parse(process.env.SMART_LAUNCHES) : null;
const patients = JSON.parse(process.env.FHIR_PATIENTS || '{}'); // {id: Patient resource}
const SMART_SCOPES = ['launch', 'fhirUser', 'patient/Patient.rs', 'patient/Patient.read',
                      'patient/*.rs', 'patient/*.read'];
const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const jwk = { ...(await exportJWK(privateKey)), kid: 'test-key', alg: 'RS256', use: 'sig' };

const clients = [{
  client_id: process.env.CLIENT_ID,
  client_secret: process.env.CLIENT_SECRET,
  redirect_uris: [process.env.REDIRECT_URI],
  post_logout_redirect_uris: [process.env.POST_LOGOUT_URI],
  response_types: ['code'],
  grant_types: ['authorization_code'],
}];
if (process.env.OTHER_CLIENT_ID) { // another application of the same hospital
  clients.push({
    client_id: process.env.OTHER_CLIENT_ID,
    client_secret: process.env.OTHER_CLIENT_SECRET,
    redirect_uris: [process.env.OTHER_REDIRECT_URI],
    response_types: ['code'],
    grant_types: ['authorization_code'],
  });
}

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [jwk] },
  cookies: { keys: ['test-only-cookie-key'] },
  claims: { openid: ['sub'], email: ['email'], profile: ['name'],
            ...(launches ? { fhirUser: ['fhirUser'] } : {}) },
  ...(launches ? { scopes: ['openid', 'offline_access', ...SMART_SCOPES],
                   extraParams: ['launch', 'aud'] } : {}),
  conformIdTokenClaims: false, // put profile claims in the ID token itself
  features: { devInteractions: { enabled: false }, rpInitiatedLogout: { enabled: true },
              introspection: { enabled: true } }, // RFC 7662, for opaque access tokens
  // When (and how) the person signed in travels with the access token and so in the
  // introspection answer, as Keycloak and others do; the portal needs it before a change.
  async extraTokenClaims(ctx, token) {
    const code = ctx?.oidc?.entities?.AuthorizationCode;
    if (token.kind !== 'AccessToken' || !code) return undefined;
    return { auth_time: code.authTime, acr: code.acr, amr: code.amr };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, sub) {
    const user = users[sub];
    if (!user) return undefined;
    return { accountId: sub, claims: async () => ({ sub, email: user.email, name: user.name,
                                                    fhirUser: user.fhirUser }) };
  },
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const page = (uid, error) => `<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in</title></head>
<body><h1>Hospital sign-in</h1>${error ? `<p role="alert">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>User name <input name="username" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></body></html>`;

async function formBody(req) {
  let raw = '';
  for await (const chunk of req) { raw += chunk; if (raw.length > 10000) break; }
  return Object.fromEntries(new URLSearchParams(raw));
}

provider.use(async (ctx, next) => {
  const match = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (!match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { prompt, params } = details;
  if (prompt.name === 'consent') {
    const grant = new provider.Grant({ accountId: details.session.accountId,
                                       clientId: params.client_id });
    grant.addOIDCScope(params.scope);
    const grantId = await grant.save();
    return provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } },
                                        { mergeWithLastSubmission: true });
  }
  if (ctx.method === 'GET') { ctx.type = 'html'; ctx.body = page(details.uid); return; }
  const form = await formBody(ctx.req);
  const user = users[form.username];
  if (!user || user.password !== form.password) {
    ctx.type = 'html'; ctx.status = 401; ctx.body = page(details.uid, 'Wrong user name or password.');
    return;
  }
  return provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: form.username } },
                                      { mergeWithLastSubmission: false });
});

if (launches) {
  const launchOfCode = new Map(); // authorization code -> launch id
  const patientOfToken = new Map(); // access token -> the launch's patient id
  const fhir = `${issuer}/fhir`;
  provider.use(async (ctx, next) => {
    if (ctx.path === '/fhir/.well-known/smart-configuration') {
      ctx.body = { issuer, jwks_uri: `${issuer}/jwks`,
                   authorization_endpoint: `${issuer}/auth`, token_endpoint: `${issuer}/token`,
                   grant_types_supported: ['authorization_code'],
                   token_endpoint_auth_methods_supported: ['client_secret_basic'],
                   scopes_supported: ['openid', ...SMART_SCOPES],
                   response_types_supported: ['code'], code_challenge_methods_supported: ['S256'],
                   capabilities: ['launch-ehr', 'client-confidential-symmetric', 'sso-openid-connect',
                                  'context-ehr-patient', 'context-ehr-encounter', 'permission-v2',
                                  'permission-patient'] };
      return;
    }
    const read = ctx.path.match(/^\/fhir\/Patient\/([A-Za-z0-9.-]{1,64})$/);
    if (read) {
      const bearer = (ctx.get('Authorization').match(/^Bearer (.+)$/) || [])[1];
      const token = bearer && await provider.AccessToken.find(bearer);
      ctx.type = 'application/fhir+json';
      if (!token) { ctx.status = 401; ctx.body = { resourceType: 'OperationOutcome' }; return; }
      if (patientOfToken.get(bearer) !== read[1] || !patients[read[1]]) {
        ctx.status = 404; ctx.body = { resourceType: 'OperationOutcome' }; return;
      }
      ctx.body = patients[read[1]];
      return;
    }
    if (ctx.path === '/auth' && ctx.query.launch !== undefined && !launches[ctx.query.launch]) {
      ctx.status = 400; ctx.body = 'unknown launch'; return;
    }
    if (ctx.path === '/auth' && ctx.query.aud !== undefined && ctx.query.aud !== fhir) {
      ctx.status = 400; ctx.body = 'aud is not this FHIR server'; return;
    }
    await next();
    const location = ctx.response.get('Location');
    const launch = ctx.oidc?.params?.launch;
    if (location && launch) {
      const code = new URL(location, issuer).searchParams.get('code');
      if (code) launchOfCode.set(code, launch);
    }
    if (ctx.oidc?.route === 'token' && ctx.status === 200 && ctx.body?.access_token) {
      const context = launches[launchOfCode.get(ctx.oidc.params.code)];
      if (context) {
        ctx.body = { ...ctx.body, ...context };
        patientOfToken.set(ctx.body.access_token, context.patient);
      }
    }
  });
}

provider.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
