// The page's labels in Portuguese and English. Elements name their label with data-i18n
// (text), data-i18n-placeholder, data-i18n-title or data-i18n-aria-label.

export const LABELS = {
  pt: {
    title: 'Chat do Farense',
    model: 'Modelo',
    modelLoading: 'a carregar…',
    newConversation: 'Nova conversa',
    otherLanguage: 'English',
    otherLanguageLabel: 'Mudar a língua para inglês',
    conversation: 'Conversa',
    inputLabel: 'A sua pergunta',
    placeholder: 'Escreva a sua pergunta…',
    send: 'Enviar',
    stop: 'Parar',
    you: 'Você',
    bot: 'Farense',
    empty: 'Pergunte o que quiser sobre o Sporting Clube Farense.',
    answering: 'A responder…',
    stopped: 'interrompida',
    firstToken: (s) => `1.º token em ${s} s`,
    tokensPerSecond: (n) => `${n} tokens/s`,
    dropped: (n) => `${n} mensagens antigas não foram enviadas (limite do servidor)`,
    tooLarge: 'A mensagem é demasiado longa para enviar.',
    rateLimited: (s) => `Demasiados pedidos. Pode perguntar de novo dentro de ${s} s.`,
    tooManyAnswers: 'Já tem uma resposta a caminho: espere que termine.',
    restarting: 'O modelo está a reiniciar. Tente de novo dentro de momentos.',
    busy: 'O modelo está ocupado. Tente de novo dentro de momentos.',
    timeout: 'O modelo demorou demasiado a responder.',
    tooLong: 'A conversa é demasiado longa para o modelo: comece uma nova conversa.',
    refused: 'O pedido foi recusado.',
    connectionLost: 'A ligação ao servidor caiu. Verifique a rede e tente de novo.',
    failed: 'Algo correu mal no servidor. Tente de novo.',
    storageFull: 'Não foi possível guardar a conversa neste navegador.',
  },
  en: {
    title: 'Farense chat',
    model: 'Model',
    modelLoading: 'loading…',
    newConversation: 'New conversation',
    otherLanguage: 'Português',
    otherLanguageLabel: 'Switch the language to Portuguese',
    conversation: 'Conversation',
    inputLabel: 'Your question',
    placeholder: 'Type your question…',
    send: 'Send',
    stop: 'Stop',
    you: 'You',
    bot: 'Farense',
    empty: 'Ask anything about Sporting Clube Farense.',
    answering: 'Answering…',
    stopped: 'stopped',
    firstToken: (s) => `first token in ${s} s`,
    tokensPerSecond: (n) => `${n} tokens/s`,
    dropped: (n) => `${n} older messages were not sent (the server's limit)`,
    tooLarge: 'The message is too long to send.',
    rateLimited: (s) => `Too many requests. You can ask again in ${s} s.`,
    tooManyAnswers: 'An answer is already on its way: wait for it to finish.',
    restarting: 'The model is restarting. Try again in a moment.',
    busy: 'The model is busy. Try again in a moment.',
    timeout: 'The model took too long to answer.',
    tooLong: 'The conversation is too long for the model: start a new one.',
    refused: 'The request was refused.',
    connectionLost: 'The connection to the server dropped. Check the network and try again.',
    failed: 'Something went wrong on the server. Try again.',
    storageFull: 'The conversation could not be saved in this browser.',
  },
};

const LANG_KEY = 'farense-chat.lang';

/** The language chosen before, else the browser's (Portuguese for pt-*), else English. */
export function pickLanguage(storage, languages) {
  try {
    const saved = storage.getItem(LANG_KEY);
    if (saved && LABELS[saved]) return saved;
  } catch { /* storage disabled */ }
  return languages.some((l) => /^pt\b/i.test(l)) ? 'pt' : 'en';
}

export function rememberLanguage(storage, lang) {
  try { storage.setItem(LANG_KEY, lang); } catch { /* storage disabled */ }
}

/** Sets the labels of every element under `root` that names one. */
export function applyLabels(root, labels) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = labels[el.dataset.i18n];
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) el.placeholder = labels[el.dataset.i18nPlaceholder];
  for (const el of root.querySelectorAll('[data-i18n-aria-label]')) el.setAttribute('aria-label', labels[el.dataset.i18nAriaLabel]);
}
