// A link that cannot be opened (unknown, ended or locked): the landing page's copy of its
// code is of no more use, so it does not stay in this tab (a shared family computer).
try { sessionStorage.removeItem('share-link-code'); } catch (e) { /* no storage */ }
