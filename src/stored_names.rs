//! Names stored in a database (and shown to people) for a service's states: each spelled once,
//! in the enum that [`stored_names!`] declares; SQL binds `as_str`, reads go through `parse`.
//! The services' domain modules declare their own (order-svc's statuses, payment-svc's
//! payment states, gateway-sim's authorization states).

/// Declares an enum whose values are stored (and shown) by name: each name is spelled here
/// once; the SQL, the read model, the wire mapping and the tools use `as_str`/`parse`.
#[macro_export]
macro_rules! stored_names {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name stored in the database and shown to people.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// Parses a stored name; `None` for a name this build does not know.
            pub fn parse(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|value| value.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
